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

from sidecar.core import exact, phases, protocol, receipts, retries
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    FacilitatorUnavailable,
    InvalidPayment,
    NonceReused,
    PaymentError,
    SettlementFailed,
    SettlementPending,
    UnsupportedScheme,
)
from sidecar.core.exact import Eip3009Authorization
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer
from sidecar.core.retries import Retry
from sidecar.ledger.accounts import Redelivered
from sidecar.ledger.authorizations import Authorizations, Recording
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
from sidecar.server.schemes.base import (
    Charged,
    Closing,
    Held,
    HoldingScheme,
    Payment,
)


@dataclass(frozen=True, slots=True)
class Authorized:
    """An authorization that matched this route's offer, and the request it pays for."""

    auth: Eip3009Authorization
    request: Request


SETTLEMENT_PENDING = SettlementPending.reason  # the standard's errorReason (x402 2.25)


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

    async def settle_recorded(
        self, auth: Eip3009Authorization, within: float | None, recording: Recording
    ) -> dict[str, str] | Redelivered:
        """`settle`, the outcome recorded with the settlement; a payment already recorded
        is redelivered: what it recorded, nothing verified or settled (protocol.md §13)."""
        reservation = await self.authorizations.reserve(
            auth.payer, auth.key, auth.valid_before, within, recording=recording
        )
        if isinstance(reservation, Redelivered):
            return reservation
        await self.verified(auth, reservation)
        return await self.settle_reserved(auth, reservation, recording)

    async def verify(
        self, auth: Eip3009Authorization, within: float | None = None, owner: str = ""
    ) -> str:
        """The first half: reserve the authorization in the ledger (until it expires) and
        /verify it; the reservation, or a typed refusal with nothing reserved (a verify
        moves nothing: the same authorization may come again)."""
        reservation = await self.authorizations.reserve(
            auth.payer, auth.key, auth.valid_before, within, owner
        )
        assert isinstance(reservation, str)  # nothing recorded, nothing redelivered
        await self.verified(auth, reservation)
        return reservation

    async def verified(self, auth: Eip3009Authorization, reservation: str) -> None:
        """/verify a reserved authorization; a refusal frees the reservation."""
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

    async def release(self, auth: Eip3009Authorization, reservation: str) -> None:
        """Nothing moved on chain: free the authorization (if still this reservation's)."""
        with contextlib.suppress(PaymentError):  # the reservation then simply expires
            await self.authorizations.release(auth.payer, auth.key, reservation)

    async def settle_reserved(
        self, auth: Eip3009Authorization, reservation: str, recording: Recording | None = None
    ) -> dict[str, str]:
        """The second half: /settle a verified, reserved authorization. An unknown outcome
        is resolved on chain; unresolved, the authorization is left `pending` and the
        answer is 503 settlement_pending: the same authorization, sent again, is resolved
        then (recover), never settled twice."""
        via = "facilitator"
        try:
            settled = await self.facilitator.settle(auth.envelope, auth.requirements.to_wire())
        except SettleUnknown:
            via, transaction = "chain", await self.resolve(auth, reservation)
        except FacilitatorUnavailable:
            await self.release(auth, reservation)  # the request never reached the facilitator
            raise
        else:
            if settled.success and settled.transaction:
                transaction = settled.transaction
            elif settled.transaction:  # sent, then failed or pending: look at the chain
                failed = "" if settled.reason == SETTLEMENT_PENDING else settled.reason
                via = "chain"
                transaction = await self.resolve(auth, reservation, settled.transaction, failed)
            else:
                await self.release(auth, reservation)
                reason = settled.reason or "settle_failed"
                message = settled.message or "the settlement failed; nothing was charged"
                raise SettlementFailed(
                    message,
                    exact.settle_response(auth, "", reason, message),
                    facilitator_reason=reason,
                )
        with contextlib.suppress(PaymentError):  # settled on chain: the reservation holds
            await self.authorizations.settled(
                auth.payer, auth.key, reservation, transaction, recording, via
            )
        return {**settled_facts(auth, transaction), "via": via}

    async def resolve(
        self, auth: Eip3009Authorization, reservation: str, sent: str = "", failed: str = ""
    ) -> str:
        """A settle whose outcome is unknown (`sent`: the transaction the facilitator named,
        if any): its transaction if the chain shows the authorization used; else
        settlement_failed after a transaction the facilitator saw fail, or the
        authorization is left pending (503 settlement_pending)."""
        found = await self.landed(auth)
        if found is not None:
            return found or sent or "unknown"
        if failed:  # the reservation stays until the authorization expires
            message = "the settlement transaction failed; nothing was charged"
            raise SettlementFailed(
                message, exact.settle_response(auth, "", failed, message), facilitator_reason=failed
            )
        with contextlib.suppress(PaymentError):  # else it stays `reserved`: refused as today
            await self.authorizations.pending(auth.payer, auth.key, reservation, sent)
        raise pending(auth, sent)

    async def landed(self, auth: Eip3009Authorization, resettle: bool = False) -> str | None:
        """Did the authorization land? Its transaction ("" when the chain shows it used but
        the log is not found), or None when the lookup window (`lookup` seconds) passed
        without seeing it. `resettle`: ask the facilitator first (/settle again: the token
        takes an authorization once, so this never moves money twice). A failed chain read
        is retried inside the window, not taken for an answer."""
        if resettle:
            with contextlib.suppress(FacilitatorUnavailable):
                again = await self.facilitator.settle(auth.envelope, auth.requirements.to_wire())
                if again.success and again.transaction:
                    return again.transaction
        if self.chain is None:
            return None
        token = auth.requirements.asset
        deadline = time.monotonic() + self.lookup
        while True:
            with contextlib.suppress(FacilitatorUnavailable):  # a failed read: look again
                if await self.chain.authorization_used(token, auth.payer, auth.nonce):
                    with contextlib.suppress(FacilitatorUnavailable):
                        return await self.chain.transaction_of(token, auth.payer, auth.nonce)
                    return ""
            if time.monotonic() + self.RESOLVE_INTERVAL > deadline:
                return None
            await asyncio.sleep(self.RESOLVE_INTERVAL)

    async def recover(
        self,
        auth: Eip3009Authorization,
        reused: NonceReused,
        owner: str = "",
        recording: Recording | None = None,
    ) -> dict[str, str]:
        """The same authorization sent again, found taken in the ledger (`reused`, its
        `state`). Only `owner`'s (a top-up's payer; "" on a paid route) is resolved: one
        left pending, or (a top-up) one whose chain transfer an earlier attempt could not
        credit; the settled facts when it landed, and a pending one is taken over by this
        check alone (another re-sent copy gets nonce_reused). A paid route's authorization
        that was settled, or is still being settled, stays a replay (nonce_reused)."""
        state = str(reused.details.get("state", ""))
        kind, _, rest = state.partition(":")
        found, _, holder = rest.rpartition(":")
        if holder != owner or kind not in ("pending", "reserved", "settled"):
            raise reused
        if kind != "pending" and not owner:
            raise reused
        if kind == "settled" and found:
            return {**settled_facts(auth, found), "via": "chain"}
        landed = await self.landed(auth, resettle=kind == "pending")
        if landed is None:
            if kind == "pending":
                raise pending(auth, found)
            raise NonceReused("this authorization is being settled; try again shortly")
        transaction = landed or found or "unknown"
        if kind == "pending":
            took = await self.authorizations.settled(
                auth.payer, auth.key, state, transaction, recording, "chain"
            )  # recorded: its own retries are redelivered from now on
            if not took:
                raise reused
        return {**settled_facts(auth, transaction), "via": "chain"}


def pending(auth: Eip3009Authorization, transaction: str) -> SettlementPending:
    """The answer to a settle whose outcome is still unknown: send the same again."""
    known = {"transaction": transaction} if transaction else {}
    return SettlementPending(
        "the settlement's outcome is not known yet; the money may have moved: send this "
        "same payment again after Retry-After (never a new one): it is settled at most once",
        **known,
        network=auth.requirements.network,
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
        upfront = price.phase is None  # else verified now, settled after the service
        auth = exact.verify(payment, exact.offer(onchain, price.amount, self.terms, upfront), now)
        covered = retries.fingerprint(
            request.method, request.path, request.query, price.amount, onchain.token, price.route
        )
        retry = Retry(retries.identity(None, auth.key), covered)
        return Payment(auth.payer, Authorized(auth, request), nonce=auth.nonce, retry=retry)

    async def charge(
        self, payment: Payment[Authorized], price: Price, now: int, within: float | None
    ) -> Charged:
        """Settle on check; the outcome is recorded with the settlement, so a retry of the
        same payment (the same authorization, or payment-identifier id) is redelivered; an
        authorization sent again after settlement_pending is resolved (recover)."""
        auth, receipt_id = payment.terms.auth, protocol.new_receipt_id()
        settled: dict[str, str] | Redelivered
        recording = None
        if payment.retry is not None:
            kept = {"receipt_id": receipt_id, "issued_at": str(now), "nonce": auth.nonce}
            recording = Recording(payment.retry, self.gateway.redelivery_limit, kept)
        try:
            if recording is None:
                settled = await self.settler.settle(auth, within)
            else:
                settled = await self.settler.settle_recorded(auth, within, recording)
        except NonceReused as reused:  # sent again after settlement_pending: resolve it
            settled = await self.settler.recover(auth, reused, recording=recording)
        redelivered = isinstance(settled, Redelivered)
        if isinstance(settled, Redelivered):  # its first receipt, signed again
            outcome = settled.outcome
            receipt_id, now = outcome["receipt_id"], int(outcome["issued_at"])
            settled = {
                **settled_facts(auth, outcome["transaction"]),
                "nonce": outcome["nonce"],  # the authorization that paid (a payment id's)
                "via": outcome["via"],
            }
        receipt = receipts.exact_body(
            auth.sender,
            payment.terms.request.resource,
            price.asset,
            price.amount,
            settled,
            receipt_id,
            self.gateway.payee,
            now,
        )
        signed = protocol.sign_receipt(receipt, self.gateway.identity)
        settlement = exact.settle_response(auth, settled["transaction"])
        return Charged(signed, 0 if redelivered else price.amount, None, settlement=settlement,
                       redelivered=redelivered)  # fmt: skip

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
        signed = protocol.sign_receipt(body, self.gateway.identity)
        settlement = exact.settle_response(auth, settled["transaction"])
        return Closing(closed, signed, None, facts, settlement)

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
        unsettled = exact.settle_response(
            auth, "", "service_failed", f"the service answered {status}; nothing was settled"
        )
        signed = protocol.sign_receipt(body, self.gateway.identity)
        return Closing(closed, signed, None, {}, unsettled)


def _compact(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _authorization(meta: Mapping[str, str]) -> Eip3009Authorization:
    requirements = Offer.from_wire(json.loads(meta[REQUIREMENTS]))
    return exact.restore(json.loads(meta[ENVELOPE]), requirements)


def _record(meta: Mapping[str, str], auth: Eip3009Authorization, payee: str) -> dict[str, str]:
    """The request facts of the decision line (processing/phase._describe), as a hold's record."""
    return {"resource": meta[RESOURCE], "nonce": auth.nonce, "payee": payee}
