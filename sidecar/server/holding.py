"""The hold step of `charge: on_success` routes, one object per scheme that supports it.

At check time a scheme's `hold` places the hold (ledger/holds.py) instead of charging; the
ext_authz servicer answers allow with the hold's facts as dynamic metadata, which Envoy's
ext_proc filter forwards to the response phase (server/processor.py). There the same
scheme's `capture` or `release` closes it, and the signed receipt states what was charged.
A scheme without a hold step (channel vouchers) is charged on check on such a route.

Two schemes hold: `prepaid-ed25519` proofs (a hold in the payer's prepaid balance) and x402
`exact` (the authorization reserved and /verify'd at the check, /settle'd after success
only, released untouched on a failure: x402's standard verify-then-settle flow).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.core import exact, holds, protocol, receipts
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import FacilitatorUnavailable, PaymentError, UnsupportedScheme
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import CAPTURED, NO_HOLD, RELEASED, Closed, Holds
from sidecar.server.envoy.contract import (
    ASSET,
    ENVELOPE,
    HELD,
    HOLD,
    HOLD_SCHEME,
    HOST,
    HTTP_SCHEME,
    PAYER,
    REQUEST_ID,
    REQUIREMENTS,
    RESERVATION,
    RESOURCE,
    ROUTE,
)
from sidecar.server.logs import get_logger
from sidecar.server.schemes import ExactSettler, Payment


@dataclass(frozen=True, slots=True)
class Held:
    hold_id: str  # also the receipt id of its capture
    amount: int  # atomic units held
    balance: str | None  # what the payer has left to spend (wire decimal); None: on chain
    extra: Mapping[str, str] = field(default_factory=dict)  # more metadata for the response
    payer: str = ""  # the payer as the service is told (exact: the envelope's `from`)


@dataclass(frozen=True, slots=True)
class Closing:
    """What a capture or release did, and the signed receipt the client gets with the
    response (None: there was no hold to close)."""

    closed: Closed
    receipt: dict[str, Any] | None
    balance: str | None  # the payer's balance after it (wire decimal); None: on chain
    facts: Mapping[str, Any] = field(default_factory=dict)  # for the decision line


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
        meta: Mapping[str, str],
        asset: Asset,
        capture: holds.Capture,
        now: int,
        within: float | None,
    ) -> Closing:
        """Charge `capture.amount` of the hold whose metadata is `meta`; raises a typed
        PaymentError when it cannot (the response is then not served)."""
        ...

    async def release(
        self, meta: Mapping[str, str], asset: Asset, status: int, now: int
    ) -> Closing: ...


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
            proof, price.asset, price.amount, price.route, proof.payee, now
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
        meta: Mapping[str, str],
        asset: Asset,
        capture: holds.Capture,
        now: int,
        within: float | None,
    ) -> Closing:
        payer, hold_id, held = meta[PAYER], meta[HOLD], int(meta[HELD])
        extra = receipts.hold_extra(held, capture.units)
        closed = await self.holds.capture(payer, hold_id, capture.amount, now, extra, within)
        if closed.outcome != CAPTURED:
            return Closing(closed, None, None)
        receipt = capture_receipt(self.gateway, payer, hold_id, closed, asset, now, capture.units)
        return Closing(closed, receipt, asset.to_decimal(closed.balance))

    async def release(
        self, meta: Mapping[str, str], asset: Asset, status: int, now: int
    ) -> Closing:
        payer, hold_id = meta[PAYER], meta[HOLD]
        closed = await self.holds.release(payer, hold_id)
        if closed.outcome == NO_HOLD:
            return Closing(closed, None, None)
        receipt = release_receipt(self.gateway, payer, hold_id, closed, asset, status, now)
        return Closing(closed, receipt, asset.to_decimal(closed.balance))


class ExactHolds:
    """x402 `exact` on a route charged on success: verify at the check, settle after it.

    The check reserves the EIP-3009 authorization in the ledger (until its validBefore:
    copies and replays stop there) and has the facilitator /verify it; no /settle, so
    nothing moves on chain. The response phase /settles it when the service succeeded
    (a failed settle withholds the response: 402 settlement_failed, or 503), or releases
    the reservation when it failed, so the same authorization may pay again. An EIP-3009
    authorization is for one fixed value: a metered route, which captures less than it
    holds, cannot be paid with `exact` (400 unsupported_scheme)."""

    name = exact.SCHEME

    def __init__(self, gateway: Gateway, settler: ExactSettler) -> None:
        self.gateway, self.settler = gateway, settler
        self._releasing: set[asyncio.Future[None]] = set()  # held until done

    async def hold(
        self,
        payment: Payment,
        price: Price,
        phase: holds.ResponsePhase,
        now: int,
        late: Callable[[Held | PaymentError], None] | None,
        within: float | None,
    ) -> Held:
        if phase.metered:
            raise UnsupportedScheme(
                f"route {price.route} is metered: an exact authorization is for one fixed "
                "value and cannot be charged for the units served; pay it with a prepaid proof"
            )
        auth: exact.Authorization
        request: Request
        auth, request = payment.terms
        hold_id = protocol.new_receipt_id()
        task = asyncio.ensure_future(self.settler.verify(auth, within))
        try:
            reservation = await asyncio.shield(task)
        except asyncio.CancelledError:
            # Envoy gave up on the check: no response phase will come for this request, so
            # the reservation is freed as soon as the verify is done.
            task.add_done_callback(lambda done: self._abandoned(done, auth, late))
            raise
        extra = {
            ENVELOPE: _compact(auth.envelope),
            REQUIREMENTS: _compact(auth.requirements),
            RESERVATION: reservation,
            RESOURCE: request.resource,
            HOST: request.host,
            HTTP_SCHEME: request.scheme,
        }
        envelope_from = str(auth.envelope["payload"]["authorization"]["from"])
        return Held(hold_id, price.amount, None, extra, envelope_from)

    def _abandoned(
        self,
        done: asyncio.Future[str],
        auth: exact.Authorization,
        late: Callable[[Held | PaymentError], None] | None,
    ) -> None:
        if done.cancelled():
            return
        error = done.exception()
        if error is None:
            releasing = asyncio.ensure_future(self.settler.release(auth, done.result()))
            self._releasing.add(releasing)
            releasing.add_done_callback(self._releasing.discard)
            error = FacilitatorUnavailable(
                "the check was abandoned before the facilitator answered; nothing was reserved"
            )
        if late is not None and isinstance(error, PaymentError):
            late(error)

    async def capture(
        self,
        meta: Mapping[str, str],
        asset: Asset,
        capture: holds.Capture,
        now: int,
        within: float | None,
    ) -> Closing:
        held = int(meta[HELD])
        if capture.amount != held:  # the hold refused metered routes: never here
            raise ValueError("an exact authorization settles its whole value or nothing")
        auth = _authorization(meta)
        settled = await self.settler.settle_reserved(auth, meta[RESERVATION])
        envelope_from = str(auth.envelope["payload"]["authorization"]["from"])
        body = receipts.exact_body(
            envelope_from, meta[RESOURCE], asset, held, settled, meta[HOLD],
            self.gateway.payee, now,
        )  # fmt: skip
        body["held"] = asset.to_decimal(held)
        closed = Closed(CAPTURED, 0, held, _record(meta, auth, self.gateway.payee), held)
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
        network, token = str(auth.requirements["network"]), str(auth.requirements["asset"])
        envelope_from = str(auth.envelope["payload"]["authorization"]["from"])
        body = receipts.exact_release_body(
            envelope_from, meta[RESOURCE], asset, held, network, token, auth.nonce,
            meta[HOLD], self.gateway.payee, status, now,
        )  # fmt: skip
        closed = Closed(RELEASED, 0, held, _record(meta, auth, self.gateway.payee), held)
        return Closing(closed, protocol.sign_receipt(body, self.gateway.identity), None)


def _compact(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _authorization(meta: Mapping[str, str]) -> exact.Authorization:
    return exact.restore(json.loads(meta[ENVELOPE]), json.loads(meta[REQUIREMENTS]))


def _record(meta: Mapping[str, str], auth: exact.Authorization, payee: str) -> dict[str, str]:
    """The request facts of the decision line (processor._describe), as a hold's record."""
    return {"resource": meta[RESOURCE], "nonce": auth.nonce, "payee": payee}


def registry(
    gateway: Gateway, ledger: Ledger, settler: ExactSettler | None = None
) -> dict[str, HoldingScheme]:
    schemes: list[HoldingScheme] = [ProofHolds(gateway, ledger)]
    if gateway.exact is not None and settler is not None:
        schemes.append(ExactHolds(gateway, settler))
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
        **held.extra,
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
    signer = gateway.signer(str(entry.get("payee", "")))
    return protocol.sign_receipt(receipts.body(payer, entry, asset), signer)


def release_receipt(
    gateway: Gateway, payer: str, hold_id: str, closed: Closed, asset: Asset, status: int,
    now: int, record: Mapping[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    body = receipts.release_body(
        payer, hold_id, record or closed.record, asset, closed.held, closed.balance, status, now
    )
    return protocol.sign_receipt(body, gateway.signer(str(body["payee"])))


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
