"""x402 `exact` on EVM: an EIP-3009 authorization, settled at most once through the
facilitator (server/facilitation.py). Nothing moves in the prepaid ledger: the chain's
transfer is the payment, the ledger holds the authorization's reservation.

Charged on check ("upfront"): reserve, /verify and /settle before the request goes on. On
a route charged on success: reserve and /verify at the check, /settle after the service
succeeded, release the reservation untouched when it failed (x402's verify-then-settle
flow). The top-up route (server/topup.py) buys prepaid credit through the same settler.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import exact, phases, protocol, receipts, retries
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    FacilitatorUnavailable,
    NonceReused,
    PaymentError,
    UnsupportedScheme,
)
from sidecar.core.exact import Eip3009Authorization
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer
from sidecar.core.retries import Retry
from sidecar.ledger.accounts import Redelivered
from sidecar.ledger.authorizations import Recording
from sidecar.ledger.holds import CAPTURED, RELEASED, HoldClosed
from sidecar.server import replays
from sidecar.server.envoy.contract import (
    ENVELOPE,
    HELD,
    HOLD,
    HOST,
    HTTP_SCHEME,
    OUTCOME,
    REQUIREMENTS,
    RESERVATION,
    RESOURCE,
)
from sidecar.server.logs import get_logger
from sidecar.server.schemes.base import (
    Charged,
    Closing,
    Held,
    HoldingScheme,
    Payment,
)
from sidecar.server.settler import ExactSettler, settled_facts

log = get_logger("sidecar.exact")


@dataclass(frozen=True, slots=True)
class Authorized:
    """An authorization that matched this route's offer, and the request it pays for."""

    auth: Eip3009Authorization
    request: Request


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
            request.method,
            request.path,
            request.query,
            price.amount,
            onchain.token,
            price.route,
            request.body_digest,
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
            recording = self._recording(payment.retry, receipt_id, now, auth.nonce)
        try:
            if recording is None:
                settled = await self.settler.settle(auth, within)
            else:
                settled = await self.settler.settle_recorded(auth, within, recording)
        except NonceReused as reused:  # sent again after settlement_pending: resolve it
            settled = await self.settler.recover(auth, reused, recording=recording)
        if isinstance(settled, Redelivered):  # its first receipt, signed again
            return self._redelivered(payment, price, settled)
        return self._charged(payment, price, settled, receipt_id, now)

    def _redelivered(
        self, payment: Payment[Authorized], price: Price, again: Redelivered, held: bool = False
    ) -> Charged:
        """A retry of a recorded payment: its first receipt, signed again, nothing charged;
        with its kept response, if any (server/replays.py)."""
        outcome, auth = again.outcome, payment.terms.auth
        settled = {
            **settled_facts(auth, outcome["transaction"]),
            "nonce": outcome["nonce"],  # the authorization that paid (a payment id's)
            "via": outcome["via"],
        }
        receipt_id, now = outcome["receipt_id"], int(outcome["issued_at"])
        charged = self._charged(payment, price, settled, receipt_id, now, held)
        kept = replays.recorded(outcome)
        return dataclasses.replace(charged, amount=0, redelivered=True, response=kept)

    def _charged(
        self, payment: Payment[Authorized], price: Price, settled: Mapping[str, str],
        receipt_id: str, now: int, held: bool = False,
    ) -> Charged:  # fmt: skip
        auth = payment.terms.auth
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
        if held:  # settled at the response: its receipt says what it held
            receipt["held"] = price.asset.to_decimal(price.amount)
        signed = protocol.sign_receipt(receipt, self.gateway.identity)
        settlement = exact.settle_response(auth, settled["transaction"])
        return Charged(signed, price.amount, None, settlement=settlement)

    def _recording(
        self, retry: Retry, receipt_id: str, now: int, nonce: str, response: str = ""
    ) -> Recording:
        kept = {"receipt_id": receipt_id, "issued_at": str(now), "nonce": nonce}
        limit, per_payer = self.gateway.redelivery_limit, self.gateway.replay_per_payer
        return Recording(retry, limit, kept, response, per_payer)

    async def hold(
        self, payment: Payment[Authorized], price: Price, phase: phases.ResponsePhase, now: int,
        within: float | None,
    ) -> Held | Charged:  # fmt: skip
        """Reserve the authorization in the ledger (until its validBefore: copies and
        replays stop there) and have the facilitator /verify it; no /settle, so nothing
        moves on chain until the response phase. A payment settled at a response before is
        a retry: its recorded outcome (and response), nothing verified; one left
        settlement_pending is resolved (recover) and, landed, passes settled."""
        if phase.metered:
            raise UnsupportedScheme(
                f"route {price.route} is metered: an exact authorization is for one fixed "
                "value and cannot be charged for the units served; pay it with a prepaid proof"
            )
        auth, request = payment.terms.auth, payment.terms.request
        hold_id = protocol.new_receipt_id()
        if payment.retry is None:
            reservation: str | Redelivered = await self.settler.verify(auth, within)
        else:
            recording = self._recording(payment.retry, hold_id, now, auth.nonce)
            try:
                reservation = await self.settler.verify_recorded(auth, within, recording)
            except NonceReused as reused:  # sent again after settlement_pending
                settled = await self.settler.recover(auth, reused, recording=recording)
                return self._charged(payment, price, settled, hold_id, now, held=True)
        if isinstance(reservation, Redelivered):
            return self._redelivered(payment, price, reservation, held=True)
        extra = {
            ENVELOPE: _compact(auth.envelope),
            REQUIREMENTS: _compact(auth.requirements.to_wire()),
            RESERVATION: reservation,
            RESOURCE: request.resource,
            HOST: request.host,
            HTTP_SCHEME: request.scheme,
        }
        if payment.retry is not None:
            extra[OUTCOME] = f"{payment.retry.identity} {payment.retry.fingerprint}"
        return Held(hold_id, price.amount, None, extra, auth.sender)

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
        recording = None
        if meta.get(OUTCOME):  # recorded with the settlement: its retries are answered so
            identity, _, covered = meta[OUTCOME].partition(" ")
            retry = Retry(identity, covered)
            recording = self._recording(retry, meta[HOLD], now, auth.nonce, capture.response)
        settled = await self.settler.settle_reserved(auth, meta[RESERVATION], recording)
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
