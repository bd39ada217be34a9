"""The payment schemes the servicer accepts, each one object of the same shape:

    verify (pure: every check that needs no ledger) → charge (one ledger step) → receipt

The servicer picks a scheme by the payment's `scheme`, and alone writes the decision line
and counts revenue from what `charge` returns; a new scheme (x402 `exact`, holds) is one
more object here, not another branch in the servicer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sidecar.core import decision, protocol, receipts, vouchers
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import PaymentError
from sidecar.core.pricing import Price
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels


@dataclass(frozen=True, slots=True)
class Payment:
    """A payment that passed every check before the ledger."""

    payer: str
    terms: Any  # the scheme's parsed form (a Proof, a Voucher)
    invoice_id: str | None = None
    nonce: str | None = None  # a proof's nonce: the rate limiter takes no token for a replay
    facts: Mapping[str, str] = field(default_factory=dict)  # for the decision line


@dataclass(frozen=True, slots=True)
class Charged:
    """What one ledger step took, and the signed receipt that says so."""

    receipt: dict[str, Any]
    amount: int  # atomic units charged: the revenue
    balance: str  # what the payer has left (in a channel: left in it), as a wire decimal


Late = Callable[[Charged | PaymentError], None]
T = TypeVar("T")


class Scheme(Protocol):
    name: str
    reason: str  # the decision line's reason for an allowed payment

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment:
        """Every check that needs no ledger, cheapest first; raises a typed PaymentError."""
        ...

    async def charge(
        self, payment: Payment, price: Price, now: int, late: Late | None, within: float | None
    ) -> Charged:
        """The one ledger step; `late` gets the outcome if Envoy gives up meanwhile."""
        ...


class Proofs:
    """`prepaid-ed25519`: a signed proof debits the payer's prepaid balance."""

    name = protocol.SCHEME
    reason = "paid"

    def __init__(self, gateway: Gateway, ledger: Ledger) -> None:
        self.gateway, self.ledger = gateway, ledger

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment:
        proof = decision.verify_payment(
            request, price, self.gateway, now, protocol.proof_from(payment)
        )
        return Payment(proof.payer, proof, proof.invoice_id, proof.nonce)

    async def charge(
        self, payment: Payment, price: Price, now: int, late: Late | None, within: float | None
    ) -> Charged:
        proof: protocol.Proof = payment.terms
        asset, receipt_id = price.asset, protocol.new_receipt_id()
        record = receipts.debit_record(
            proof, asset, price.amount, price.route, self.gateway.payee, now
        )

        def charged(balance: int) -> Charged:
            entry = {**record, "receipt_id": receipt_id, "balance": balance}
            receipt = receipts.body(proof.payer, entry, asset)
            signed = protocol.sign_receipt(receipt, self.gateway.identity)
            return Charged(signed, price.amount, receipt["balance"])

        listener = None if late is None else _relay(late, charged)
        balance = await self.ledger.debit(
            proof.payer,
            proof.nonce,
            asset.code,
            price.amount,
            proof.expires_at,
            receipt_id,
            record,
            listener,
            within,
        )
        return charged(balance)


class Vouchers:
    """`channel-ed25519`: a voucher raises what a channel's deposit owes the payee."""

    name = vouchers.SCHEME
    reason = "channel"

    def __init__(self, gateway: Gateway, ledger: Ledger) -> None:
        self.gateway, self.channels = gateway, Channels(ledger)

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment:
        voucher = vouchers.voucher_from(payment)
        cumulative = vouchers.verify_voucher(voucher, request, price, self.gateway)
        return Payment(
            voucher.payer, (voucher, cumulative), facts={"channel_id": voucher.channel_id}
        )

    async def charge(
        self, payment: Payment, price: Price, now: int, late: Late | None, within: float | None
    ) -> Charged:
        voucher, cumulative = payment.terms
        receipt_id, payee = protocol.new_receipt_id(), self.gateway.payee

        def charged(accepted: tuple[int, int]) -> Charged:
            remaining, increment = accepted
            receipt = receipts.voucher_body(
                voucher, price.asset, cumulative, increment, remaining, receipt_id, payee, now
            )
            signed = protocol.sign_receipt(receipt, self.gateway.identity)
            return Charged(signed, increment, receipt["balance"])

        listener = None if late is None else _relay(late, charged)
        accepted = await self.channels.accept(
            voucher, cumulative, price, payee, now, listener, within
        )
        return charged(accepted)


def _relay(late: Late, charged: Callable[[T], Charged]) -> Callable[[T | PaymentError], None]:
    """A ledger outcome for a caller that gave up → the servicer's `late` callback."""

    def relay(outcome: T | PaymentError) -> None:
        late(outcome if isinstance(outcome, PaymentError) else charged(outcome))

    return relay


def registry(gateway: Gateway, ledger: Ledger) -> dict[str, Scheme]:
    schemes: list[Scheme] = [Proofs(gateway, ledger), Vouchers(gateway, ledger)]
    return {scheme.name: scheme for scheme in schemes}
