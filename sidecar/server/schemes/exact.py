"""x402 `exact` on EVM: an EIP-3009 authorization, settled at most once through the
facilitator (server/facilitation.py). Nothing moves in the prepaid ledger: the chain's
transfer is the payment, the ledger holds the authorization's reservation.

Charged on check ("upfront"): reserve, /verify and /settle before the request goes on. On
a route charged on success: reserve and /verify at the check, /settle after the service
succeeded, release the reservation untouched when it failed (x402's verify-then-settle
flow). The top-up route (server/topup.py) buys prepaid credit through the same settler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import exact, phases, protocol, receipts
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    FacilitatorUnavailable,
    InvalidPayment,
    PaymentError,
    SettlementFailed,
    UnsupportedScheme,
)
from sidecar.core.exact import Eip3009Authorization
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer
from sidecar.ledger.authorizations import Authorizations
from sidecar.ledger.holds import CAPTURED, RELEASED, HoldClosed
from sidecar.server.envoy.contract import (
    ENVELOPE,
    HELD,
    HOLD,
    HOST,
    HTTP_SCHEME,
    REQUIREMENTS,
    RESERVATION,
    RESOURCE,
)
from sidecar.server.facilitation import ChainReader, FacilitatorClient, SettleUnknown
from sidecar.server.logs import get_logger
from sidecar.server.schemes.base import (
    Charged,
    Closing,
    Held,
    HoldingScheme,
    Payment,
)

log = get_logger("sidecar.exact")


@dataclass(frozen=True, slots=True)
class Authorized:
    """An authorization that matched this route's offer, and the request it pays for."""

    auth: Eip3009Authorization
    request: Request


class ExactSettler:
    """One EIP-3009 authorization, settled at most once through the facilitator: reserve
    it in the ledger (concurrent and replayed copies stop here), /verify, /settle. Shared
    by the `exact` scheme and the top-up route."""

    RESOLVE_INTERVAL = 0.5  # seconds between two looks at the chain

    def __init__(
        self,
        authorizations: Authorizations,
        facilitator: FacilitatorClient,
        chain: ChainReader | None,
        lookup: float = 3.0,  # seconds the chain is watched for a settle whose answer was lost
    ) -> None:
        self.authorizations, self.facilitator, self.chain = authorizations, facilitator, chain
        self.lookup = lookup

    async def close(self) -> None:
        await self.facilitator.close()
        if self.chain is not None:
            await self.chain.close()

    async def settle(
        self, auth: Eip3009Authorization, within: float | None = None, owner: str = ""
    ) -> dict[str, str]:
        """The settled facts (transaction, network, token, nonce, via), or a typed refusal:
        nonce_reused, facilitator_unavailable (503), invalid_payment, settlement_failed.
        `owner`: who a top-up credits, kept with the reservation."""
        reservation = await self.verify(auth, within, owner)
        return await self.settle_reserved(auth, reservation)

    async def verify(
        self, auth: Eip3009Authorization, within: float | None = None, owner: str = ""
    ) -> str:
        """The first half: reserve the authorization in the ledger (until it expires) and
        /verify it; the reservation, or a typed refusal with nothing reserved (a verify
        moves nothing: the same authorization may come again)."""
        reservation = await self.authorizations.reserve(
            auth.payer, auth.key, auth.valid_before, within, owner
        )
        try:
            verified = await self.facilitator.verify(auth.envelope, auth.requirements.to_wire())
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

    async def release(self, auth: Eip3009Authorization, reservation: str) -> None:
        """Nothing moved on chain: free the authorization (if still this reservation's)."""
        with contextlib.suppress(PaymentError):  # the reservation then simply expires
            await self.authorizations.release(auth.payer, auth.key, reservation)

    async def settle_reserved(self, auth: Eip3009Authorization, reservation: str) -> dict[str, str]:
        """The second half: /settle a verified, reserved authorization. An unknown outcome
        is resolved on chain (unresolved: it stays reserved until it expires, 503)."""
        via = "facilitator"
        try:
            settled = await self.facilitator.settle(auth.envelope, auth.requirements.to_wire())
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
        durable = False
        with contextlib.suppress(PaymentError):  # settled on chain: the reservation holds
            durable = await self.authorizations.settled(
                auth.payer, auth.key, reservation, transaction
            )
        if not durable:  # the transfer is on chain (x402 reconcile finds it); say so
            log.warning("exact.record_not_durable", authorizer=auth.payer, transaction=transaction)
        return {**settled_facts(auth, transaction), "via": via}

    async def resolve(self, auth: Eip3009Authorization, failed: str = "") -> str:
        """A settle whose outcome is unknown: did the authorization land on chain? Its
        transaction if so; else the reservation stays until the authorization expires (it
        may still land) and the answer is 503 (or settlement_failed after a failed tx)."""
        if self.chain is None:
            raise FacilitatorUnavailable(
                "the settlement's outcome is unknown; this authorization stays reserved "
                "until it expires"
            )
        token = auth.requirements.asset
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


def settled_facts(auth: Eip3009Authorization, transaction: str) -> dict[str, str]:
    return {
        "transaction": transaction,
        "network": auth.requirements.network,
        "token": auth.requirements.asset,
        "nonce": auth.nonce,
    }


class Exact(HoldingScheme[Authorized]):
    """An EIP-3009 authorization for one fixed value: a metered route, which captures less
    than it holds, cannot be paid with `exact` (400 unsupported_scheme)."""

    name = exact.SCHEME
    reason = "exact"

    def __init__(self, gateway: Gateway, settler: ExactSettler) -> None:
        assert gateway.exact is not None
        self.gateway, self.terms, self.settler = gateway, gateway.exact, settler

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment[Authorized]:
        onchain = self.terms.for_price(price)
        if onchain is None:
            raise UnsupportedScheme(f"{price.asset.code} is not payable with exact here")
        auth = exact.verify(payment, exact.offer(onchain, price.amount, self.terms), now)
        return Payment(auth.payer, Authorized(auth, request), nonce=auth.nonce)

    async def charge(
        self, payment: Payment[Authorized], price: Price, now: int, within: float | None
    ) -> Charged:
        auth = payment.terms.auth
        settled = await self.settler.settle(auth, within)
        receipt = receipts.exact_body(
            auth.sender,
            payment.terms.request.resource,
            price.asset,
            price.amount,
            settled,
            protocol.new_receipt_id(),
            self.gateway.payee,
            now,
        )
        return Charged(protocol.sign_receipt(receipt, self.gateway.identity), price.amount, None)

    async def hold(
        self, payment: Payment[Authorized], price: Price, phase: phases.ResponsePhase, now: int,
        within: float | None,
    ) -> Held:  # fmt: skip
        """Reserve the authorization in the ledger (until its validBefore: copies and
        replays stop there) and have the facilitator /verify it; no /settle, so nothing
        moves on chain until the response phase."""
        if phase.metered:
            raise UnsupportedScheme(
                f"route {price.route} is metered: an exact authorization is for one fixed "
                "value and cannot be charged for the units served; pay it with a prepaid proof"
            )
        auth, request = payment.terms.auth, payment.terms.request
        reservation = await self.settler.verify(auth, within)
        extra = {
            ENVELOPE: _compact(auth.envelope),
            REQUIREMENTS: _compact(auth.requirements.to_wire()),
            RESERVATION: reservation,
            RESOURCE: request.resource,
            HOST: request.host,
            HTTP_SCHEME: request.scheme,
        }
        return Held(protocol.new_receipt_id(), price.amount, None, extra, auth.sender)

    async def abandon(self, held: Held, payment: Payment[Authorized]) -> PaymentError | None:
        """No response phase will settle it: free the reservation, so the same
        authorization may pay again."""
        await self.settler.release(payment.terms.auth, held.extra[RESERVATION])
        return FacilitatorUnavailable(
            "the check was abandoned before the facilitator answered; nothing was reserved"
        )

    async def capture(
        self, meta: Mapping[str, str], asset: Asset, capture: phases.Capture, now: int,
        within: float | None,
    ) -> Closing:  # fmt: skip
        """/settle the reserved authorization; a failed settle withholds the response
        (402 settlement_failed, or 503)."""
        held = int(meta[HELD])
        if capture.amount != held:  # the hold refused metered routes: never here
            raise ValueError("an exact authorization settles its whole value or nothing")
        auth = _authorization(meta)
        settled = await self.settler.settle_reserved(auth, meta[RESERVATION])
        body = receipts.exact_body(
            auth.sender, meta[RESOURCE], asset, held, settled, meta[HOLD], self.gateway.payee,
            now,
        )  # fmt: skip
        body["held"] = asset.to_decimal(held)
        closed = HoldClosed(CAPTURED, 0, held, _record(meta, auth, self.gateway.payee), held)
        facts = {
            "transaction": settled["transaction"],
            "network": settled["network"],
            "settled_via": settled["via"],
        }
        return Closing(closed, protocol.sign_receipt(body, self.gateway.identity), None, facts)

    async def release(
        self, meta: Mapping[str, str], asset: Asset, status: int, now: int
    ) -> Closing:
        held = int(meta[HELD])
        auth = _authorization(meta)
        await self.settler.release(auth, meta[RESERVATION])
        network, token = auth.requirements.network, auth.requirements.asset
        body = receipts.exact_release_body(
            auth.sender, meta[RESOURCE], asset, held, network, token, auth.nonce,
            meta[HOLD], self.gateway.payee, status, now,
        )  # fmt: skip
        closed = HoldClosed(RELEASED, 0, held, _record(meta, auth, self.gateway.payee), held)
        return Closing(closed, protocol.sign_receipt(body, self.gateway.identity), None)


def _compact(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _authorization(meta: Mapping[str, str]) -> Eip3009Authorization:
    requirements = Offer.from_wire(json.loads(meta[REQUIREMENTS]))
    return exact.restore(json.loads(meta[ENVELOPE]), requirements)


def _record(meta: Mapping[str, str], auth: Eip3009Authorization, payee: str) -> dict[str, str]:
    """The request facts of the decision line (processor._describe), as a hold's record."""
    return {"resource": meta[RESOURCE], "nonce": auth.nonce, "payee": payee}
