"""`channel-ed25519`: a voucher raises what a channel's deposit owes the payee, in one
ledger script. No hold step: on a route charged on success a voucher is charged on check."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import protocol, receipts, vouchers
from sidecar.core.decision import Gateway, Request
from sidecar.core.pricing import Price
from sidecar.core.vouchers import Voucher
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels
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
        return Payment(
            voucher.payer, Signed(voucher, cumulative), facts={"channel_id": voucher.channel_id}
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
        remaining, increment = await self.channels.accept(
            voucher, cumulative, price, self.gateway.payee_list, now, within
        )
        receipt = receipts.voucher_body(
            voucher, price.asset, cumulative, increment, remaining, receipt_id, payee, now
        )
        signed, header = protocol.signed_receipt(receipt, self.gateway.signer(payee))
        return Charged(signed, increment, receipt["balance"], header)
