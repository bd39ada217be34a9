"""A payment in flight inside one X402Auth flow: the signed proof (prepaid) or `exact`
authorization riding on its request, the budget set aside for it, and how its answer
settles that budget (committed, released or partly returned) and checks the receipt."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.agent.discovery import Discovery, origin_of
from sidecar.agent.exact import (
    ExactOffer,
    Onchain,
    check_exact_receipt,
    find_onchain,
    official_default,
)
from sidecar.agent.flows import Step
from sidecar.agent.outcomes import answer_of, never_sent, outcome_unknown, transport_cause
from sidecar.agent.proofs import check_receipt
from sidecar.agent.receipts import (
    NOT_JSON,
    RECEIPT_EXTENSION,
    attach,
    bad_receipt,
    receipt_fields,
    receipt_header,
    report,
)
from sidecar.agent.wallet import Reservation, scale_atomic, scaled, unscaled
from sidecar.core.protocol import Proof


@dataclass
class PrepaidPayment:
    """One signed proof in flight; lives only inside one auth_flow generator."""

    reservation: Reservation
    proof: Proof
    request: httpx.Request  # the request it rides on: its answer is the paid one

    def identity(self, origin: str) -> dict[str, Any]:
        names = ("nonce", "invoice_id", "payer", "payee", "resource", "asset", "amount")
        return {**{name: getattr(self.proof, name) for name in names}, "origin": origin}


@dataclass
class ExactPayment:
    """One signed `exact` authorization in flight."""

    reservation: Reservation
    onchain: Onchain  # the asset it is counted in, and its decimals
    amount: int  # atomic
    payer: str  # the EVM address that signed
    resource: str | None  # METHOD path; None for a top-up

    def identity(self, origin: str) -> dict[str, Any]:
        return {
            "payer": self.payer,
            "resource": self.resource,
            "asset": self.onchain.asset,
            "amount": unscaled(scale_atomic(self.amount, self.onchain.decimals)),
            "origin": origin,
        }


@dataclass(frozen=True)
class Checking:
    """How an answer's receipt is checked: against which keys, and whether a bad one
    raises (strict) or warns."""

    keys: Mapping[str, str] | None
    strict: bool
    pinned: bool  # the keys are X402Auth's gateway_keys, not discovery's

    def worded(self, problem: str | None) -> str | None:
        """A receipt's problem, naming the keys it was checked against as they came."""
        if problem is None or not self.pinned:
            return problem
        return problem.replace("the gateway's published keys", "the pinned keys (gateway_keys)")


def send_paid(
    request: httpx.Request, payment: PrepaidPayment | ExactPayment
) -> Generator[Step, httpx.Response | None, httpx.Response]:
    """`send` for a request that carries a proof. Abandoned before its answer came (a
    timeout, a dropped connection, a cancellation), the payment may have been charged: it
    is counted as spent, and a transport error becomes PaymentOutcomeUnknown. A proof
    whose connection never opened did not leave: its reservation goes back."""
    try:
        response = yield request
    except GeneratorExit as closing:
        cause = transport_cause(closing, request)
        if cause is not None and never_sent(cause):
            payment.reservation.release()
            raise
        payment.reservation.commit()
        if cause is not None:
            raise outcome_unknown(request, payment.identity(origin_of(request.url)), cause) from (
                cause
            )
        raise
    assert response is not None
    return response


def carry(request: httpx.Request, final: httpx.Response) -> None:
    """The receipt of a redirected request's paid hop, also on the last hop's response."""
    paid = answer_of(request, final)
    if paid is not final and RECEIPT_EXTENSION in paid.extensions:
        receipt = paid.extensions[RECEIPT_EXTENSION]
        final.extensions = {**final.extensions, RECEIPT_EXTENSION: receipt}


def onchain_of(offer: ExactOffer, discovery: Discovery | None) -> Onchain | None:
    """The ledger asset an exact offer's token backs (the gateway's discovery), else the
    official client's well-known token (USDC on Base, …); None when neither knows it."""
    found = find_onchain(discovery.onchain, offer.network, offer.token) if discovery else None
    return found or official_default(offer.network, offer.token)


def settle_prepaid(payment: PrepaidPayment, response: httpx.Response, checking: Checking) -> None:
    """Account for a prepaid payment by its (paid) answer, and check its receipt."""
    header = receipt_header(response)
    if header is None:
        if response.status_code >= 400:
            payment.reservation.release()  # a denial: the gateway charged nothing
            return
        # Success without a receipt: we may have paid, so it counts against the budget.
        payment.reservation.commit()
        message = f"{response.status_code} response carries no payment receipt"
        bad_receipt(message, checking.strict, response)
        return
    fields = receipt_fields(header)
    if fields is None:
        payment.reservation.commit()
        bad_receipt(NOT_JSON, checking.strict, response)
        return
    problem = check_receipt(fields, payment.proof, checking.keys)
    # A verified receipt of a hold says what was really charged: the budget gets the
    # rest back (all of it when the service failed and the hold was released).
    captured = None
    if problem is None and ("held" in fields or fields.get("success") is False):
        captured = scaled(str(fields["amount"]))
    if captured == 0 and fields.get("success") is False:
        payment.reservation.release()
    else:
        payment.reservation.commit(captured)
    problem = checking.worded(problem)
    report(attach(response, fields, problem), problem, checking.strict, response)


def settle_exact(payment: ExactPayment, response: httpx.Response, checking: Checking) -> None:
    """Account for an `exact` payment by its answer, and check its receipt."""
    header = receipt_header(response)
    if header is None:
        if 400 <= response.status_code < 500:
            payment.reservation.release()  # refused before anything settled
            return
        # A 5xx may come after the chain moved the money; a 2xx did pay.
        payment.reservation.commit()
        if response.status_code < 400:
            message = f"{response.status_code} response carries no payment receipt"
            bad_receipt(message, checking.strict, response)
        return
    payment.reservation.commit()
    fields = receipt_fields(header)
    if fields is None:
        bad_receipt(NOT_JSON, checking.strict, response)
        return
    problem = check_exact_receipt(
        fields,
        checking.keys,
        payer=payment.payer,
        resource=payment.resource,
        asset=payment.onchain.asset,
        atomic=payment.amount,
        decimals=payment.onchain.decimals,
    )
    problem = checking.worded(problem)
    report(attach(response, fields, problem), problem, checking.strict, response)
