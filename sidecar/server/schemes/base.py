"""The shape every payment kind has, and the hold machinery the holding kinds share.

    verify (pure: every check that needs no ledger) → charge (one ledger step) → receipt

The check (server/authz) picks a scheme by the payment's `scheme`, and alone writes the
decision line and counts revenue from what `charge` returns. On a route charged on success
(`charge: on_success`), a HoldingScheme's `hold` places a hold instead of charging; the
check answers allow with the hold's facts as ext_authz dynamic metadata, which Envoy
forwards to the response phase (server/processing/). There the same
scheme's `capture` or `release` closes it, and the signed receipt states what was charged.
A scheme without a hold step (channel vouchers) is charged on check on such a route.

None of these steps hears of Envoy giving up: the check finishes a started ledger step and
its bookkeeping in one place (server/authz/check.py), and a hold whose check Envoy
abandoned goes to the scheme's `abandon` (no response phase will come for it).
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sidecar.core import phases
from sidecar.core.decision import Request
from sidecar.core.errors import PaymentError
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.retries import Retry
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import HoldClosed, Holds
from sidecar.server.envoy.contract import (  # the keys a hold carries to the response phase
    AMOUNT,
    ASSET,
    HELD,
    HOLD,
    HOLD_FACTS,
    HOLD_SCHEME,
    PAYER,
    RECEIPT_ID,
    REQUEST_ID,
    ROUTE,
)
from sidecar.server.logs import get_logger
from sidecar.server.replays import Recorded

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Payment(Generic[T]):
    """A payment that passed every check before the ledger; `terms` is its scheme's own
    parsed form (a Proof, a signed voucher, an EIP-3009 authorization)."""

    payer: str
    terms: T
    invoice_id: str | None = None
    nonce: str | None = None  # a proof's nonce: the rate limiter takes no token for a replay
    facts: Mapping[str, str] = field(default_factory=dict)  # for the decision line
    retry: Retry | None = None  # how the ledger knows it again (None: not recorded)


@dataclass(frozen=True, slots=True)
class Charged:
    """What one ledger step took, and the signed receipt that says so."""

    receipt: dict[str, Any]
    amount: int  # atomic units charged: the revenue
    balance: str | None  # what the payer has left (in a channel: in it); None: paid on chain
    header: str | None = None  # the receipt's header value, if signing already encoded it
    settlement: Mapping[str, Any] | None = None  # `exact`: the standard's PAYMENT-RESPONSE
    redelivered: bool = False  # a retry of a payment already charged: nothing charged now
    response: Recorded | None = None  # its recorded response: the retry is answered with it


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

    closed: HoldClosed
    receipt: dict[str, Any] | None
    balance: str | None  # the payer's balance after it (wire decimal); None: on chain
    facts: Mapping[str, Any] = field(default_factory=dict)  # for the decision line
    settlement: Mapping[str, Any] | None = None  # `exact`: the standard's PAYMENT-RESPONSE


class Scheme(ABC, Generic[T]):
    """One payment kind: its name on the wire, its checks and its ledger step."""

    name: str
    reason: str  # the decision line's reason for an allowed payment

    @abstractmethod
    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment[T]:
        """Every check that needs no ledger, cheapest first; raises a typed PaymentError."""

    @abstractmethod
    async def charge(
        self, payment: Payment[T], price: Price, now: int, within: float | None
    ) -> Charged:
        """The one ledger step; `within`: seconds Envoy still waits (the scripts refuse
        past it, so a check answered 503 charges nothing)."""


class HoldingScheme(Scheme[T]):
    """A scheme that can also hold at the check and close the hold at the response."""

    @abstractmethod
    async def hold(
        self, payment: Payment[T], price: Price, phase: phases.ResponsePhase, now: int,
        within: float | None,
    ) -> Held | Charged:  # fmt: skip
        """Hold the payment's amount; or, for a retry of a payment whose hold was already
        captured, its first receipt again, charged nothing (`Charged`, redelivered)."""

    @abstractmethod
    async def abandon(self, held: Held, payment: Payment[T]) -> PaymentError | None:
        """Envoy gave up on the check that placed `held`: no response phase will come.
        Keep the hold (None: it expires) or free it and say why the check failed."""

    @abstractmethod
    async def capture(
        self, meta: Mapping[str, str], asset: Asset, capture: phases.Capture, now: int,
        within: float | None,
    ) -> Closing:  # fmt: skip
        """Charge `capture.amount` of the hold whose metadata is `meta`; raises a typed
        PaymentError when it cannot (the response is then not served)."""

    @abstractmethod
    async def release(
        self, meta: Mapping[str, str], asset: Asset, status: int, now: int
    ) -> Closing: ...


def metadata(
    held: Held, payment: Payment[Any], scheme: str, price: Price, request_id: str | None
) -> dict[str, str]:
    """What the response phase needs, as ext_authz dynamic metadata (strings): the hold's id,
    its facts packed in one key (contract.HOLD_FACTS), and the access log's fields."""
    assert price.phase is not None
    facts = {
        HOLD_SCHEME: scheme,
        ASSET: price.asset.code,
        HELD: str(held.amount),
        ROUTE: price.route,
        REQUEST_ID: request_id or "",
        **held.extra,
        **phases.phase_annotations(price.phase, price.asset),
    }
    return {
        HOLD: held.hold_id,
        HOLD_FACTS: json.dumps(facts, separators=(",", ":")),
        PAYER: payment.payer,
        # the access log's fields, as for a charge: the amount is the hold until captured
        AMOUNT: price.display,
        RECEIPT_ID: held.hold_id,
    }


def unpacked(meta: dict[str, str]) -> dict[str, str]:
    """The check's metadata as the response phase reads it: the hold's packed facts
    (metadata) spread into their own keys. Facts that do not parse are left out, so the
    phase finds the hold incomplete and refuses to serve (never serves it free)."""
    packed = meta.pop(HOLD_FACTS, None)
    if packed is None:
        return meta
    try:
        facts = json.loads(packed)
    except ValueError:
        return meta
    if isinstance(facts, dict):
        meta.update((k, v) for k, v in facts.items() if isinstance(v, str) and k not in meta)
    return meta


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
