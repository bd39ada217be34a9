"""The payment schemes the servicer accepts, each one object of the same shape:

    verify (pure: every check that needs no ledger) → charge (one ledger step) → receipt

The servicer picks a scheme by the payment's `scheme`, and alone writes the decision line
and counts revenue from what `charge` returns; a new scheme (x402 `exact`, holds) is one
more object here, not another branch in the servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sidecar.core import decision, exact, protocol, receipts, vouchers
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    FacilitatorUnavailable,
    InvalidPayment,
    PaymentError,
    SettlementFailed,
    UnsupportedScheme,
)
from sidecar.core.pricing import Price
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.authorizations import Authorizations
from sidecar.ledger.channels import Channels
from sidecar.server.facilitation import Chain, Facilitator, SettleUnknown


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
    balance: str | None  # what the payer has left (in a channel: in it); None: paid on chain
    header: str | None = None  # the receipt's header value, if signing already encoded it


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
        # Paid to the payee the proof names (the current key, or a previous one after a
        # rotation): that key signs the receipt, here and when settlement re-signs it.
        record = receipts.debit_record(proof, asset, price.amount, price.route, proof.payee, now)
        signer = self.gateway.signer(proof.payee)

        def charged(balance: int) -> Charged:
            entry = {**record, "receipt_id": receipt_id, "balance": balance}
            receipt = receipts.body(proof.payer, entry, asset)
            signed, header = protocol.signed_receipt(receipt, signer)
            return Charged(signed, price.amount, receipt["balance"], header)

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
        # The payee the voucher names (a previous key's, from an agent whose discovery
        # predates a rotation) signs its receipt; the channel script checks that the
        # channel's payee is one of the gateway's keys (one opened before the rotation
        # works until it is closed, and its close is signed by the key it was opened to).
        receipt_id, payee = protocol.new_receipt_id(), voucher.payee
        signer = self.gateway.signer(payee)

        def charged(accepted: tuple[int, int]) -> Charged:
            remaining, increment = accepted
            receipt = receipts.voucher_body(
                voucher, price.asset, cumulative, increment, remaining, receipt_id, payee, now
            )
            signed, header = protocol.signed_receipt(receipt, signer)
            return Charged(signed, increment, receipt["balance"], header)

        listener = None if late is None else _relay(late, charged)
        accepted = await self.channels.accept(
            voucher, cumulative, price, self.gateway.payee_list, now, listener, within
        )
        return charged(accepted)


class ExactSettler:
    """One EIP-3009 authorization, settled at most once through the facilitator: reserve
    it in the ledger (concurrent and replayed copies stop here), /verify, /settle. Shared
    by the `exact` scheme and the top-up route."""

    RESOLVE_INTERVAL = 0.5  # seconds between two looks at the chain

    def __init__(
        self,
        authorizations: Authorizations,
        facilitator: Facilitator,
        chain: Chain | None,
        lookup: float = 3.0,  # seconds the chain is watched for a settle whose answer was lost
    ) -> None:
        self.authorizations, self.facilitator, self.chain = authorizations, facilitator, chain
        self.lookup = lookup

    async def close(self) -> None:
        await self.facilitator.close()
        if self.chain is not None:
            await self.chain.close()

    async def settle(
        self, auth: exact.Authorization, within: float | None = None, owner: str = ""
    ) -> dict[str, str]:
        """The settled facts (transaction, network, token, nonce, via), or a typed refusal:
        nonce_reused, facilitator_unavailable (503), invalid_payment, settlement_failed.
        `owner`: who a top-up credits, kept with the reservation."""
        reservation = await self.verify(auth, within, owner)
        return await self.settle_reserved(auth, reservation)

    async def verify(
        self, auth: exact.Authorization, within: float | None = None, owner: str = ""
    ) -> str:
        """The first half: reserve the authorization in the ledger (until it expires) and
        /verify it; the reservation, or a typed refusal with nothing reserved (a verify
        moves nothing: the same authorization may come again)."""
        reservation = await self.authorizations.reserve(
            auth.payer, auth.key, auth.valid_before, within, owner
        )
        try:
            verified = await self.facilitator.verify(auth.envelope, auth.requirements)
        except FacilitatorUnavailable:
            await self.release(auth, reservation)
            raise
        if not verified.valid:
            await self.release(auth, reservation)
            raise InvalidPayment(
                verified.message or "the facilitator found the authorization invalid",
                facilitator_reason=verified.reason or "invalid",
            )
        return reservation

    async def release(self, auth: exact.Authorization, reservation: str) -> None:
        """Nothing moved on chain: free the authorization (if still this reservation's)."""
        with contextlib.suppress(PaymentError):  # the reservation then simply expires
            await self.authorizations.release(auth.payer, auth.key, reservation)

    async def settle_reserved(self, auth: exact.Authorization, reservation: str) -> dict[str, str]:
        """The second half: /settle a verified, reserved authorization. An unknown outcome
        is resolved on chain (unresolved: it stays reserved until it expires, 503)."""
        via = "facilitator"
        try:
            settled = await self.facilitator.settle(auth.envelope, auth.requirements)
        except SettleUnknown:
            via, transaction = "chain", await self.resolve(auth)  # unresolved: stays reserved
        except FacilitatorUnavailable:
            await self.release(auth, reservation)  # the request never reached the facilitator
            raise
        else:
            if settled.success and settled.transaction:
                transaction = settled.transaction
            elif settled.transaction:  # sent, then failed: look at the chain, not the answer
                via, transaction = "chain", await self.resolve(auth, failed=settled.reason)
            else:
                await self.release(auth, reservation)
                raise SettlementFailed(
                    settled.message or "the settlement failed; nothing was charged",
                    facilitator_reason=settled.reason or "settle_failed",
                )
        with contextlib.suppress(PaymentError):  # settled on chain: the reservation holds
            await self.authorizations.settled(auth.payer, auth.key, reservation, transaction)
        return {**settled_facts(auth, transaction), "via": via}

    async def resolve(self, auth: exact.Authorization, failed: str = "") -> str:
        """A settle whose outcome is unknown: did the authorization land on chain? Its
        transaction if so; else the reservation stays until the authorization expires (it
        may still land) and the answer is 503 (or settlement_failed after a failed tx)."""
        if self.chain is None:
            raise FacilitatorUnavailable(
                "the settlement's outcome is unknown; this authorization stays reserved "
                "until it expires"
            )
        token = str(auth.requirements["asset"])
        deadline = time.monotonic() + self.lookup
        while True:
            if await self.chain.authorization_used(token, auth.payer, auth.nonce):
                found = await self.chain.transaction_of(token, auth.payer, auth.nonce)
                return found or "unknown"
            if time.monotonic() + self.RESOLVE_INTERVAL > deadline:
                break
            await asyncio.sleep(self.RESOLVE_INTERVAL)
        if failed:
            raise SettlementFailed(
                "the settlement transaction failed; nothing was charged",
                facilitator_reason=failed,
            )
        raise FacilitatorUnavailable(
            "the settlement's outcome is unknown; this authorization stays reserved until it "
            "expires"
        )


def settled_facts(auth: exact.Authorization, transaction: str) -> dict[str, str]:
    return {
        "transaction": transaction,
        "network": str(auth.requirements["network"]),
        "token": str(auth.requirements["asset"]),
        "nonce": auth.nonce,
    }


class Exact:
    """x402 `exact` on EVM: an EIP-3009 authorization, verified and settled through the
    facilitator before the request is forwarded ("upfront"). Nothing moves in the prepaid
    ledger: the chain's transfer is the payment, the ledger holds the reservation."""

    name = exact.SCHEME
    reason = "exact"

    def __init__(self, gateway: Gateway, settler: ExactSettler) -> None:
        assert gateway.exact is not None
        self.gateway, self.terms, self.settler = gateway, gateway.exact, settler

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment:
        onchain = self.terms.for_price(price)
        if onchain is None:
            raise UnsupportedScheme(f"{price.asset.code} is not payable with exact here")
        auth = exact.verify(payment, exact.offer(onchain, price.amount, self.terms), now)
        return Payment(auth.payer, (auth, request), nonce=auth.nonce)

    async def charge(
        self, payment: Payment, price: Price, now: int, late: Late | None, within: float | None
    ) -> Charged:
        auth: exact.Authorization
        auth, request = payment.terms
        resource = request.resource
        envelope_from = str(auth.envelope["payload"]["authorization"]["from"])

        async def settle() -> Charged:
            settled = await self.settler.settle(auth, within)
            receipt = receipts.exact_body(
                envelope_from,
                resource,
                price.asset,
                price.amount,
                settled,
                protocol.new_receipt_id(),
                self.gateway.payee,
                now,
            )
            return Charged(
                protocol.sign_receipt(receipt, self.gateway.identity), price.amount, None
            )

        # Envoy may give up during a long settle: the settlement goes on, and `late` gets
        # its outcome, so the decision line and the revenue are never lost.
        task = asyncio.ensure_future(settle())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if late is not None:
                task.add_done_callback(lambda done: _finish_late(done, late))
            raise


def _finish_late(done: asyncio.Future[Charged], late: Late) -> None:
    if done.cancelled():
        return
    error = done.exception()
    if isinstance(error, PaymentError):
        late(error)
    elif error is None:
        late(done.result())


def _relay(late: Late, charged: Callable[[T], Charged]) -> Callable[[T | PaymentError], None]:
    """A ledger outcome for a caller that gave up → the servicer's `late` callback."""

    def relay(outcome: T | PaymentError) -> None:
        late(outcome if isinstance(outcome, PaymentError) else charged(outcome))

    return relay


def registry(
    gateway: Gateway, ledger: Ledger, settler: ExactSettler | None = None
) -> dict[str, Scheme]:
    schemes: list[Scheme] = [Proofs(gateway, ledger), Vouchers(gateway, ledger)]
    if gateway.exact is not None and settler is not None:
        schemes.append(Exact(gateway, settler))
    return {scheme.name: scheme for scheme in schemes}
