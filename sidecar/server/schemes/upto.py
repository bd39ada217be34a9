"""x402 `upto` on EVM: a Permit2 witness transfer for a maximum, verified at the check and
settled at the response for the amount the response phase captured (usage x unit price,
capped at the hold, which is the maximum), once. Nothing moves in the prepaid ledger: the
chain's transfer is the payment; the ledger holds the authorization's reservation, as for
`exact` (server/schemes/exact.py; `ExactSettler` in server/settler.py reserves and
verifies both).

Offered where the amount is known at the response (a metered route, or `charge:
on_success`) once the facilitator's /supported names its `facilitatorAddress` for the
network (core/upto.py). A failure status settles nothing and frees the reservation, so
the same authorization pays once the service succeeds (within its deadline). A replayed
authorization stops at the ledger's reservation, before the facilitator is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import phases, protocol, receipts, upto
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    FacilitatorUnavailable,
    PaymentError,
    SettlementFailed,
    SettlementPending,
    UnsupportedScheme,
)
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer
from sidecar.core.upto import Permit2Authorization
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
from sidecar.server.facilitation import SettleUnknown
from sidecar.server.schemes.base import Charged, Closing, Held, HoldingScheme, Payment
from sidecar.server.settler import SETTLEMENT_PENDING, ExactSettler

NO_TRANSACTION = "none"  # the reservation's record of a zero settlement: nothing sent


@dataclass(frozen=True, slots=True)
class Authorized:
    """An upto authorization that matched this route's offer, and the request it pays."""

    auth: Permit2Authorization
    request: Request


class Upto(HoldingScheme[Authorized]):
    name = upto.SCHEME
    reason = "upto"

    def __init__(self, gateway: Gateway, settler: ExactSettler) -> None:
        assert gateway.exact is not None
        self.gateway, self.terms, self.settler = gateway, gateway.exact, settler

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment[Authorized]:
        found = upto.offer_for(self.terms.for_price(price), price, self.terms)
        if not found:
            raise UnsupportedScheme(
                f"route {price.route} does not take upto: it is offered on routes settled at "
                "the response (metered or charge: on_success) whose asset a token backs, "
                "once the facilitator lists upto for its network"
            )
        auth = upto.verify(payment, found[0], now)
        return Payment(auth.payer, Authorized(auth, request), nonce=auth.nonce)

    async def charge(
        self, payment: Payment[Authorized], price: Price, now: int, within: float | None
    ) -> Charged:
        """A route charged on success whose Envoy runs no response phase: the price is
        settled at the check (reserve, /verify, /settle)."""
        auth, request = payment.terms.auth, payment.terms.request
        reservation = await self.settler.verify(auth, within)
        transaction = await self._settle(auth, reservation, price.amount)
        facts = _facts(auth, transaction)
        receipt = _receipt(auth, request.resource, price.asset, price.amount, facts,
                           protocol.new_receipt_id(), self.gateway.payee, now)  # fmt: skip
        signed = protocol.sign_receipt(receipt, self.gateway.identity)
        settlement = auth.settle_response(price.amount, transaction)
        return Charged(signed, price.amount, None, settlement=settlement)

    async def hold(
        self, payment: Payment[Authorized], price: Price, phase: phases.ResponsePhase, now: int,
        within: float | None,
    ) -> Held:  # fmt: skip
        """Reserve the authorization in the ledger (until its deadline: copies and replays
        stop there) and have the facilitator /verify it (which simulates the settle of the
        whole maximum); nothing moves on chain until the response phase."""
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
        await self.settler.release(payment.terms.auth, held.extra[RESERVATION])
        return FacilitatorUnavailable(
            "the check was abandoned before the facilitator answered; nothing was reserved"
        )

    async def capture(
        self, meta: Mapping[str, str], asset: Asset, capture: phases.Capture, now: int,
        within: float | None,
    ) -> Closing:  # fmt: skip
        """/settle the captured amount (never above the maximum); a failed settle withholds
        the response (402 settlement_failed, or 503)."""
        held, auth = int(meta[HELD]), _authorization(meta)
        amount = min(capture.amount, held, auth.maximum)
        transaction = await self._settle(auth, meta[RESERVATION], amount)
        facts = _facts(auth, transaction)
        body = _receipt(auth, meta[RESOURCE], asset, amount, facts, meta[HOLD],
                        self.gateway.payee, now)  # fmt: skip
        body["held"] = asset.to_decimal(held)
        closed = HoldClosed(CAPTURED, 0, amount, _record(meta, auth, self.gateway.payee), held)
        line = {"transaction": transaction, "network": auth.requirements.network}
        signed = protocol.sign_receipt(body, self.gateway.identity)
        return Closing(closed, signed, None, line, auth.settle_response(amount, transaction))

    async def release(
        self, meta: Mapping[str, str], asset: Asset, status: int, now: int
    ) -> Closing:
        """The service failed: nothing is settled and the reservation is freed, so the same
        authorization may pay again until its deadline."""
        held, auth = int(meta[HELD]), _authorization(meta)
        await self.settler.release(auth, meta[RESERVATION])
        network, token = auth.requirements.network, auth.requirements.asset
        body = receipts.exact_release_body(
            auth.sender, meta[RESOURCE], asset, held, network, token, auth.nonce,
            meta[HOLD], self.gateway.payee, status, now,
        )  # fmt: skip
        body["scheme"] = upto.SCHEME
        closed = HoldClosed(RELEASED, 0, held, _record(meta, auth, self.gateway.payee), held)
        unsettled = auth.settle_response(
            0, "", "service_failed", f"the service answered {status}; nothing was settled"
        )
        signed = protocol.sign_receipt(body, self.gateway.identity)
        return Closing(closed, signed, None, {}, unsettled)

    async def _settle(self, auth: Permit2Authorization, reservation: str, amount: int) -> str:
        """/settle `amount` of a verified, reserved authorization: its transaction, or a
        typed refusal. Nothing sent (refused, unreachable): the reservation is freed. Sent
        with an unknown outcome: the authorization stays reserved until its deadline (one
        settlement per signature; a replay is refused) and the answer is 503, unless the
        chain shows the authorization's Permit2 nonce used within the lookup (then it was
        settled: the transaction is not known)."""
        if amount == 0:  # nothing to move: the signature is spent all the same
            await self._spent(auth, reservation, NO_TRANSACTION)
            return ""
        requirements = auth.for_amount(amount).to_wire()
        try:
            settled = await self.settler.facilitator.settle(auth.envelope, requirements)
        except SettleUnknown:
            return await self._unknown(auth, reservation, "")
        except FacilitatorUnavailable:
            await self.settler.release(auth, reservation)
            raise
        if settled.success and settled.transaction:
            await self._spent(auth, reservation, settled.transaction)
            return settled.transaction
        if settled.transaction and settled.reason == SETTLEMENT_PENDING:
            return await self._unknown(auth, reservation, settled.transaction)
        if not settled.transaction:
            await self.settler.release(auth, reservation)
        reason = settled.reason or "settle_failed"
        message = settled.message or "the settlement failed; nothing was charged"
        raise SettlementFailed(
            message,
            auth.settle_response(amount, settled.transaction, reason, message),
            facilitator_reason=reason,
        )

    async def _unknown(self, auth: Permit2Authorization, reservation: str, sent: str) -> str:
        """A settle sent whose outcome is not known (`sent`: its transaction, if named):
        settled if the chain shows the nonce used, else left pending (503)."""
        if await self._landed(auth):  # the answer was lost, the transfer was not
            await self._spent(auth, reservation, sent or NO_TRANSACTION)
            return sent
        with contextlib.suppress(PaymentError):
            await self.settler.authorizations.pending(auth.payer, auth.key, reservation, sent)
        known = {"transaction": sent} if sent else {}
        raise SettlementPending(
            "the upto settlement's outcome is not known; the money may have moved",
            **known,
            network=auth.requirements.network,
        )

    async def _landed(self, auth: Permit2Authorization) -> bool:
        """Did a transfer use the authorization's Permit2 nonce? Watched on chain for the
        settler's `lookup` seconds (config chain_lookup_ms); a failed read looks again."""
        chain = self.settler.chain
        if chain is None:
            return False
        data, bit = upto.nonce_bitmap_call(auth.payer, auth.nonce)
        deadline = time.monotonic() + self.settler.lookup
        while True:
            with contextlib.suppress(FacilitatorUnavailable):
                if await chain.read_uint(upto.PERMIT2, data) & bit:
                    return True
            if time.monotonic() + self.settler.RESOLVE_INTERVAL > deadline:
                return False
            await asyncio.sleep(self.settler.RESOLVE_INTERVAL)

    async def _spent(self, auth: Permit2Authorization, reservation: str, transaction: str) -> None:
        with contextlib.suppress(PaymentError):  # settled on chain: the reservation holds
            await self.settler.authorizations.settled(
                auth.payer, auth.key, reservation, transaction
            )


def _facts(auth: Permit2Authorization, transaction: str) -> dict[str, str]:
    return {
        "transaction": transaction,
        "network": auth.requirements.network,
        "token": auth.requirements.asset,
        "nonce": auth.nonce,
    }


def _receipt(
    auth: Permit2Authorization, resource: str, asset: Asset, amount: int,
    facts: Mapping[str, str], receipt_id: str, payee: str, now: int,
) -> dict[str, Any]:  # fmt: skip
    """`exact`'s receipt shape (core/receipts.py), for the amount settled under `upto`."""
    body = receipts.exact_body(auth.sender, resource, asset, amount, facts, receipt_id, payee, now)
    body["scheme"] = upto.SCHEME
    return body


def _compact(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _authorization(meta: Mapping[str, str]) -> Permit2Authorization:
    requirements = Offer.from_wire(json.loads(meta[REQUIREMENTS]))
    return upto.restore(json.loads(meta[ENVELOPE]), requirements)


def _record(meta: Mapping[str, str], auth: Permit2Authorization, payee: str) -> dict[str, str]:
    """The request facts of the decision line (processor._describe), as a hold's record."""
    return {"resource": meta[RESOURCE], "nonce": auth.nonce, "payee": payee}
