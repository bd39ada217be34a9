"""A payment in flight inside one X402Auth flow: the signed proof (prepaid) or `exact`
authorization riding on its request, the budget set aside for it, and how its answer
settles that budget (committed, released or partly returned) and checks the receipt."""

from __future__ import annotations

import threading
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
from sidecar.agent.flows import Step, Wait
from sidecar.agent.outcomes import answer_of, never_sent, outcome_unknown, transport_cause
from sidecar.agent.proofs import check_receipt
from sidecar.agent.receipts import (
    NOT_JSON,
    RECEIPT_EXTENSION,
    attach,
    bad_receipt,
    receipt_fields,
    receipt_header,
    refusal,
    report,
    verified,
)
from sidecar.agent.retries import Retrying
from sidecar.agent.wallet import Reservation, scale_atomic, scaled, unscaled
from sidecar.core.money import to_atomic
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
    upto: bool = False  # `upto`: `amount` is the maximum; the receipt says what settled

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


# Answers that are known to have charged nothing: the budget set aside goes back.
NOTHING_CHARGED_5XX = frozenset({"ledger_unavailable", "facilitator_unavailable"})
# A refusal that says the payment was spent (by this very payment, sent earlier).
SPENT = "nonce_reused"


def unknown_outcome(response: httpx.Response) -> bool:
    """An answer after which the same payment must be sent again: a 503 without a receipt
    (the gateway, or Envoy for a sidecar that died, could not say; `settlement_pending`:
    the money may have moved)."""
    return response.status_code == 503 and receipt_header(response) is None


def send_paid(
    request: httpx.Request, payment: PrepaidPayment | ExactPayment, retrying: Retrying
) -> Generator[Step, httpx.Response | None, httpx.Response]:
    """`send` for a request that carries a proof, re-sent as it is (the same payment)
    while the answer is a 503 without a receipt, at most `retrying.retries` times.
    Abandoned before its answer came (a timeout, a dropped connection, a cancellation),
    the payment may have been charged: it is counted as spent, and a transport error
    becomes PaymentOutcomeUnknown. A proof whose connection never opened did not leave:
    its reservation goes back."""
    attempt = 0
    while True:
        response = yield from _send_once(request, payment)
        if attempt >= retrying.retries or not unknown_outcome(answer_of(request, response)):
            return response
        pause = retrying.delay(answer_of(request, response), attempt)
        attempt += 1
        if pause > 0:
            yield Wait(threading.Event(), pause)  # nothing sets it: a sleep


def _send_once(
    request: httpx.Request, payment: PrepaidPayment | ExactPayment
) -> Generator[Step, httpx.Response | None, httpx.Response]:
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


def charged_nothing(response: httpx.Response) -> bool:
    """A refusal known to have charged nothing (its budget goes back): a 4xx with the
    gateway's reason (but `nonce_reused`: this payment was spent), or a 503 whose reason
    says nothing moved. Anything else without a receipt may have been charged."""
    reason = refusal(response)
    if reason is None or reason == SPENT:
        return False
    return 400 <= response.status_code < 500 or reason in NOTHING_CHARGED_5XX


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
        if charged_nothing(response):
            payment.reservation.release()  # a refusal: the gateway charged nothing
            return
        if response.status_code >= 400:  # perhaps charged (a 503 after the retries, …)
            payment.reservation.commit()
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
        if charged_nothing(response):
            payment.reservation.release()  # refused before anything settled
            return
        # settlement_pending or another 5xx may come after the chain moved the money.
        payment.reservation.commit()
        if response.status_code < 400:
            message = f"{response.status_code} response carries no payment receipt"
            bad_receipt(message, checking.strict, response)
        return
    fields = receipt_fields(header)
    if fields is not None and payment.upto:
        settle_upto(payment, fields, response, checking)
        return
    payment.reservation.commit()
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


def settle_upto(
    payment: ExactPayment, fields: Mapping[str, Any], response: httpx.Response, checking: Checking
) -> None:
    """An `upto` payment's receipt: the budget is charged what settled (at most the
    maximum reserved), nothing when the service failed and nothing settled."""
    onchain = payment.onchain
    problem = check_exact_receipt(
        fields, checking.keys, payer=payment.payer, resource=payment.resource,
        asset=onchain.asset, atomic=payment.amount, decimals=onchain.decimals, at_most=True,
    )  # fmt: skip
    if problem is None:
        settled = to_atomic(str(fields["amount"]), onchain.decimals)
        payment.reservation.commit(scale_atomic(settled, onchain.decimals))
    elif fields.get("success") is False and verified(fields, checking.keys or {}):
        payment.reservation.release()  # a signed release: nothing settled on chain
        problem = None
    else:
        payment.reservation.commit()
    problem = checking.worded(problem)
    report(attach(response, fields, problem), problem, checking.strict, response)
