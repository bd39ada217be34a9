"""`channel-ed25519`: a voucher raises what a channel's deposit owes the payee, in one
ledger script. No hold step: on a route charged on success a voucher is charged on check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import protocol, receipts, retries, vouchers
from sidecar.core.decision import Gateway, Request
from sidecar.core.pricing import Price
from sidecar.core.retries import Retry
from sidecar.core.vouchers import Voucher
from sidecar.ledger.accounts import Ledger, Redelivered
from sidecar.ledger.channels import Accepting, Channels
from sidecar.server.schemes.base import Charged, Payment, Scheme


@dataclass(frozen=True, slots=True)
class Signed:
    """A voucher whose signature and terms checked out, and the cumulative amount it
    states (atomic units)."""

    voucher: Voucher
    cumulative: int


class Channel(Scheme[Signed]):
    name = vouchers.SCHEME
    reason = "channel"

    def __init__(self, gateway: Gateway, ledger: Ledger) -> None:
        self.gateway, self.channels = gateway, Channels(ledger)

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment[Signed]:
        voucher = vouchers.voucher_from(payment)
        cumulative = vouchers.verify_voucher(voucher, request, price, self.gateway)
        covered = retries.fingerprint(
            request.method,
            request.path,
            request.query,
            price.amount,
            voucher.payee,
            price.route,
            request.body_digest,
        )
        return Payment(
            voucher.payer,
            Signed(voucher, cumulative),
            facts={"channel_id": voucher.channel_id},
            # the channel keeps its latest voucher's outcome, whatever payment-identifier
            # id came with it (docs/protocol.md §13)
            retry=Retry(f"{voucher.channel_id}:{voucher.sequence}", covered),
        )

    async def charge(
        self, payment: Payment[Signed], price: Price, now: int, within: float | None
    ) -> Charged:
        voucher, cumulative = payment.terms.voucher, payment.terms.cumulative
        # The payee the voucher names (a previous key's, from an agent whose discovery
        # predates a rotation) signs its receipt; the channel script checks that the
        # channel's payee is one of the gateway's keys (one opened before the rotation
        # works until it is closed, and its close is signed by the key it was opened to).
        receipt_id, payee = protocol.new_receipt_id(), voucher.payee
        covered = payment.retry.fingerprint if payment.retry is not None else ""
        recording = Accepting(covered, self.gateway.redelivery_limit, receipt_id)
        accepted = await self.channels.accept(
            voucher, cumulative, price, self.gateway.payee_list, now, within, recording
        )
        if isinstance(accepted, Redelivered):  # the latest voucher again: its first receipt
            kept = accepted.outcome
            receipt_id, now = kept["receipt_id"], int(kept["issued_at"])
            remaining, increment = int(kept["balance"]), int(kept["increment"])
        else:
            remaining, increment = accepted
        receipt = receipts.voucher_body(
            voucher, price.asset, cumulative, increment, remaining, receipt_id, payee, now
        )
        signed, header = protocol.signed_receipt(receipt, self.gateway.signer(payee))
        if isinstance(accepted, Redelivered):
            return Charged(signed, 0, receipt["balance"], header, redelivered=True)
        return Charged(signed, increment, receipt["balance"], header)
