"""Agents pay with httpx: `X402Auth` answers 402 challenges, or pays from the price list.

    auth = X402Auth(Wallet.from_env(max_amount="1", budget="10"))
    response = httpx.get(url, auth=auth)
    response.extensions["x402_receipt"]  # the verified Receipt

One `auth_flow` generator serves sync and async httpx (as httpx's DigestAuth does). Every
piece of per-request state lives in the generator, so one auth object can be shared by
threads and by hundreds of concurrent tasks; the only shared state is the wallet (locked),
the discovery cache (discovery.py, shared with ChannelAuth) and the top-up state (locked).
Receipts are read and checked by receipts.py, as ChannelAuth's are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar.agent.discovery import Discovery, DiscoveryCache, origin_of, path_of
from sidecar.agent.exact import (
    ExactOffer,
    Onchain,
    TopUp,
    check_exact_receipt,
    exact_offers,
    find_onchain,
    official_default,
)
from sidecar.agent.flows import (
    SIGNATURE_HEADER,
    Flow,
    Step,
    Wait,
    drive,
    send,
    topup_flow,
    wait_async,
)
from sidecar.agent.outcomes import (
    REFUSAL_EXTENSION,
    answer_of,
    attach_refusal,
    guard,
    never_sent,
    outcome_unknown,
    refusal_of,
    transport_cause,
)
from sidecar.agent.receipts import (
    NOT_JSON,
    RECEIPT_EXTENSION,
    Receipt,
    attach,
    bad_receipt,
    receipt_fields,
    receipt_header,
    receipt_of,
    refusal,
    report,
)
from sidecar.agent.wallet import Reservation, Wallet, scale_atomic, scaled, unscaled
from sidecar.core import protocol
from sidecar.core.errors import (
    AmountError,
    ConfigError,
    InvalidChallenge,
    PaymentError,
)
from sidecar.core.pricing import Price
from sidecar.core.protocol import SCHEME, VERSION

# Re-exported so an agent needs one import line.
__all__ = [
    "RECEIPT_EXTENSION",
    "REFUSAL_EXTENSION",
    "TOPUP_EXTENSION",
    "Discovery",
    "Receipt",
    "TopUp",
    "Wallet",
    "X402Auth",
    "receipt_of",
    "refusal_of",
]

TOPUP_EXTENSION = "x402_topup"  # the TopUp an auto top-up made before this response
PROOF_HEADER = "X-Payment"
# A prepaid proof refused for one of these is what a top-up cures (auto_topup).
TOPUP_REASONS = frozenset({"unknown_payer", "insufficient_funds"})
# A direct proof refused for one of these means the price list is stale: pay the challenge.
FALLBACK_REASONS = frozenset({"invoice_mismatch", "invoice_expired", "payment_required"})
# An invoice carries what a proof echoes back, without the payer's name and signature.
INVOICE_FIELDS = {
    name: kind for name, kind in protocol.PROOF_FIELDS.items() if name not in ("payer", "signature")
}


@dataclass
class _Payment:
    """One signed proof in flight; lives only inside one auth_flow generator."""

    reservation: Reservation
    proof: dict[str, Any]
    request: httpx.Request  # the request it rides on: its answer is the paid one

    def identity(self, origin: str) -> dict[str, Any]:
        names = ("nonce", "invoice_id", "payer", "payee", "resource", "asset", "amount")
        return {**{name: self.proof.get(name) for name in names}, "origin": origin}


@dataclass
class _ExactPayment:
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


@dataclass
class _TopUps:
    """Per origin: one top-up in flight at a time; `generation` counts those that worked."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0
    running: threading.Event | None = None


def parse_invoice(response: httpx.Response) -> dict[str, Any] | None:
    """The invoice of a 402 (JSON body, else the PAYMENT-REQUIRED header); None if absent."""
    invoice: Any = None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        invoice = body.get("x402")
    header = response.headers.get("payment-required")
    if not isinstance(invoice, dict) and header:
        try:
            required = protocol.decode_header(header)
        except PaymentError:
            raise InvalidChallenge("the PAYMENT-REQUIRED header is not base64 JSON") from None
        accepts = required.get("accepts") if isinstance(required, dict) else None
        for option in accepts if isinstance(accepts, list) else []:
            if isinstance(option, dict) and option.get("scheme") == SCHEME:
                invoice = option.get("extra")
                break
    if not isinstance(invoice, dict):
        return None
    return checked_invoice(invoice, "the 402's invoice")


def checked_invoice(invoice: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The invoice fields a proof echoes back, each of its type and of our version and
    scheme; InvalidChallenge names `what` (where the invoice came from) otherwise."""
    for name, kind in INVOICE_FIELDS.items():
        if type(invoice.get(name)) is not kind:
            raise InvalidChallenge(f"{what} has no valid {name!r}")
    if invoice["version"] != VERSION or invoice["scheme"] != SCHEME:
        raise InvalidChallenge(
            f"cannot pay a {invoice['version']}/{invoice['scheme']} invoice "
            f"(this client speaks {VERSION}/{SCHEME})"
        )
    return {name: invoice[name] for name in INVOICE_FIELDS}


def _send_paid(
    request: httpx.Request, payment: _Payment | _ExactPayment
) -> Generator[Step, httpx.Response | None, httpx.Response]:
    """`_send` for a request that carries a proof. Abandoned before its answer came (a
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


class X402Auth(httpx.Auth):
    """httpx auth that pays for requests with a Wallet, at most once per request.

    - direct=True: with the gateway's price list (fetched once per origin from
      /.well-known/x402, cached `discovery_ttl` seconds) a priced request carries its proof
      on the first try: one round trip. A stale price list costs one 402, a refresh and
      the challenge's payment; never a second charge.
    - Otherwise, or for a route the price list does not know, a 402 is answered by signing
      its invoice and retrying once.
    - A wallet with an EVM key pays the x402 `exact` scheme (EIP-3009, signed by the
      official x402 client) where the 402 offers it and a prepaid proof is not possible:
      only `exact` offered, or no Ed25519 key in the wallet.
    - auto_topup="5": a prepaid proof refused for `unknown_payer` or `insufficient_funds`
      buys that much credit on the gateway's top-up route (discovery's `topup`), paid with
      `exact` from the EVM key, then retries the request with a fresh proof, once. One
      top-up at a time per origin: requests refused meanwhile wait for it, and use it.
    - Every receipt is verified against the gateway's keys from discovery (or the pinned
      `gateway_keys`, {kid: public key}) and put in `response.extensions["x402_receipt"]`;
      a bad one raises InvalidReceipt when strict=True, else warns (ReceiptWarning).
    - The wallet's guards are checked before signing; a refusal raises a GuardRefused.
    """

    requires_request_body = True  # the body is sent twice when a challenge is answered
    requires_response_body = True  # the flow reads 402 bodies and discovery documents

    def __init__(
        self,
        wallet: Wallet,
        *,
        direct: bool = True,
        strict: bool = False,
        discovery_ttl: float = 300.0,
        gateway_keys: Mapping[str, str] | None = None,
        direct_ttl: int = 60,
        auto_topup: str | None = None,
        topup_timeout: float = 120.0,
    ) -> None:
        self.wallet = wallet
        self.direct = direct
        self.strict = strict
        self.discovery_ttl = discovery_ttl
        self.direct_ttl = direct_ttl
        # Pinned receipt keys ({kid: public key}) instead of trusting discovery's.
        self.gateway_keys = dict(gateway_keys) if gateway_keys is not None else None
        if auto_topup is not None:
            scaled(auto_topup, "auto_topup")  # a decimal string, or AmountError
            if wallet.evm is None or not wallet.has_identity:
                raise ConfigError(
                    "auto_topup needs a wallet with both keys: the Ed25519 key that is "
                    "credited and the EVM key that pays"
                )
        self.auto_topup = auto_topup
        self.topup_timeout = topup_timeout  # how long a request waits for another's top-up
        self.discoveries = DiscoveryCache(discovery_ttl)
        self._topups_lock = threading.Lock()
        self._topups: dict[str, _TopUps] = {}

    # -- discovery -------------------------------------------------------------------------
    def forget(self, origin: str | None = None) -> None:
        """Drop cached discovery documents (all, or one origin like http://host:port)."""
        self.discoveries.forget(origin)

    def _discover(
        self, request: httpx.Request, origin: str
    ) -> Generator[Step, httpx.Response | None, Discovery | None]:
        """Fetch (again) the discovery document of `request`'s origin, and keep it."""
        return self.discoveries.store(origin, (yield from send(DiscoveryCache.request(request))))

    def _keys(self, discovery: Discovery | None) -> Mapping[str, str] | None:
        if self.gateway_keys is not None:
            return self.gateway_keys
        return discovery.keys if discovery is not None else None

    def _worded(self, problem: str | None) -> str | None:
        """A receipt's problem, naming the keys it was checked against as they came."""
        if problem is None or self.gateway_keys is None:
            return problem
        return problem.replace("the gateway's published keys", "the pinned keys (gateway_keys)")

    def _topup_state(self, origin: str) -> _TopUps:
        with self._topups_lock:
            return self._topups.setdefault(origin, _TopUps())

    # -- the drivers: httpx sync and async, the requests adapter ------------------------------
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """The payment flow for the requests adapter (each answer's body already read)."""
        return drive(self._flow(request, asynchronous=False))

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """The payment flow under httpx.Client: each answer is read here, inside the flow,
        so a timeout while reading it reaches the flow (an unknown outcome), not the GC."""
        if self.requires_request_body:
            request.read()
        flow = self._flow(request, asynchronous=False)
        try:
            step = next(flow)
            while True:
                if isinstance(step, Wait):
                    step.event.wait(step.timeout)
                    step = flow.send(None)
                else:
                    response = yield step
                    response.read()
                    step = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The same flow under httpx.AsyncClient: waiting for a top-up never blocks the loop."""
        if self.requires_request_body:
            await request.aread()
        flow = self._flow(request, asynchronous=True)
        try:
            step = next(flow)
            while True:
                if isinstance(step, Wait):
                    await wait_async(step)
                    step = flow.send(None)
                else:
                    response = yield step
                    await response.aread()
                    step = flow.send(response)
        except StopIteration:
            return
        finally:
            flow.close()

    # -- the flow --------------------------------------------------------------------------
    def _flow(self, request: httpx.Request, *, asynchronous: bool) -> Flow:
        """The payment flow, its proofs kept off redirects (outcomes.ProofGuard); the last
        answer, if it refuses a payment, carries the typed refusal with its next step."""
        guard(request, asynchronous)
        flow = self._pay_flow(request)
        last: httpx.Response | None = None
        try:
            step = next(flow)
            while True:
                sent = yield step
                last = sent if sent is not None else last
                step = flow.send(sent)
        except StopIteration:
            pass
        finally:
            flow.close()
        reason = refusal(last) if last is not None else None
        if last is not None and reason is not None and refusal_of(last) is None:
            wallet = self.wallet
            payer = wallet.public_key if wallet.has_identity else ""
            attach_refusal(last, reason, payer or (wallet.evm.address if wallet.evm else ""))

    def _pay_flow(self, request: httpx.Request) -> Flow:
        if PROOF_HEADER in request.headers or SIGNATURE_HEADER in request.headers:
            yield from send(request)  # the caller pays by hand (e.g. re-sends a proof)
            return
        origin = origin_of(request.url)
        cached = self.discoveries.fresh(origin)
        discovery = cached.discovery if cached is not None else None
        if self.direct and cached is None:
            discovery = yield from self._discover(request, origin)
            cached = self.discoveries.fresh(origin)

        payment = None
        generation = self._topup_state(origin).generation
        if self.direct and discovery is not None and self.wallet.has_identity:
            price = discovery.price(request.method, path_of(request.url))
            if price is not None:
                payment = self._pay(request, self._direct_terms(request, price, discovery))
        if payment is not None:
            response = yield from _send_paid(request, payment)
        else:
            response = yield from send(request)

        if payment is not None:
            reason = refusal(answer_of(request, response))
            if reason is None:
                self._settle(payment, response, discovery)
                return
            payment.reservation.release()  # refused: nothing was charged
            if self._cures(reason):
                yield from self._topup_and_retry(request, response, generation)
                return
            if response.status_code != 402 or reason not in FALLBACK_REASONS:
                return
            # The price list is stale: refresh it, then pay the invoice this 402 carries.
            discovery = yield from self._discover(request, origin)
            cached = self.discoveries.fresh(origin)
        elif response.status_code != 402 or answer_of(request, response) is not response:
            return  # free, or another URL's 402 (a redirect): a proof goes where it is priced

        offers = exact_offers(response.headers.get("payment-required"))
        can_exact = bool(offers) and self.wallet.evm is not None
        invoice = None
        if self.wallet.has_identity:
            try:
                invoice = parse_invoice(response)
            except InvalidChallenge:
                if not can_exact:
                    raise
        if invoice is None and not can_exact:
            return  # nothing this wallet can pay: the caller gets the 402 as it is
        resource = f"{request.method} {path_of(request.url)}"
        if invoice is not None and invoice["resource"] != resource:
            raise InvalidChallenge(
                f"the invoice is for {invoice['resource']!r}, not {resource!r}; not paying"
            )
        if cached is None:  # challenge mode: the keys that check the receipt
            discovery = yield from self._discover(request, origin)

        if invoice is not None:
            generation = self._topup_state(origin).generation
            payment = self._pay(request, invoice)
            response = yield from _send_paid(request, payment)
            self._settle(payment, response, discovery)
            reason = refusal(response)
            if reason is not None and self._cures(reason):
                yield from self._topup_and_retry(request, response, generation)
            return
        exact = self._pay_exact(request, offers, discovery)
        response = yield from _send_paid(request, exact)
        self._settle_exact(exact, answer_of(request, response), discovery)
        _carry(request, response)

    def _direct_terms(
        self, request: httpx.Request, price: Price, discovery: Discovery
    ) -> dict[str, Any]:
        return protocol.direct_terms(
            f"{request.method} {path_of(request.url)}",
            price.asset.code,
            price.display,
            discovery.payee,
            int(time.time()) + min(self.direct_ttl, discovery.max_direct_ttl),
        )

    def _pay(self, request: httpx.Request, terms: Mapping[str, Any]) -> _Payment:
        """Guards first (they raise), then sign; the proof rides on the request."""
        reservation = self.wallet.reserve(terms["asset"], terms["amount"], terms["payee"])
        try:
            proof = self.wallet.sign(terms)
        except BaseException:
            reservation.release()
            raise
        request.headers[PROOF_HEADER] = protocol.encode_header(proof)
        return _Payment(reservation, proof, request)

    def _settle(
        self, payment: _Payment, final: httpx.Response, discovery: Discovery | None
    ) -> None:
        """Account for a payment by its answer (a redirect's first hop, when the client
        followed it: a paid 3xx is the paid answer); its receipt goes on `final` too."""
        response = answer_of(payment.request, final)
        try:
            self._settle_answer(payment, response, discovery)
        finally:
            _carry(payment.request, final)

    def _settle_answer(
        self, payment: _Payment, response: httpx.Response, discovery: Discovery | None
    ) -> None:
        header = receipt_header(response)
        if header is None:
            if response.status_code >= 400:
                payment.reservation.release()  # a denial: the gateway charged nothing
                return
            # Success without a receipt: we may have paid, so it counts against the budget.
            payment.reservation.commit()
            message = f"{response.status_code} response carries no payment receipt"
            bad_receipt(message, self.strict, response)
            return
        fields = receipt_fields(header)
        if fields is None:
            payment.reservation.commit()
            bad_receipt(NOT_JSON, self.strict, response)
            return
        problem = check_receipt(fields, payment.proof, self._keys(discovery))
        # A verified receipt of a hold says what was really charged: the budget gets the
        # rest back (all of it when the service failed and the hold was released).
        captured = None
        if problem is None and ("held" in fields or fields.get("success") is False):
            captured = scaled(str(fields["amount"]))
        if captured == 0 and fields.get("success") is False:
            payment.reservation.release()
        else:
            payment.reservation.commit(captured)
        problem = self._worded(problem)
        report(attach(response, fields, problem), problem, self.strict, response)

    # -- exact -----------------------------------------------------------------------------
    def _pay_exact(
        self, request: httpx.Request, offers: list[ExactOffer], discovery: Discovery | None
    ) -> _ExactPayment:
        """Guards first, in the ledger asset the token backs; then the official client signs."""
        evm = self.wallet.evm
        assert evm is not None
        for offer in offers:
            onchain = onchain_of(offer, discovery)
            if onchain is not None:
                break
        else:
            tokens = ", ".join(f"{o.token} on {o.network}" for o in offers)
            raise InvalidChallenge(
                f"the 402 offers exact in {tokens}: a token neither the gateway's discovery "
                "nor the official client's table names, so its decimals are unknown; not paying"
            )
        payee = discovery.payee if discovery is not None else offer.pay_to
        reservation = self.wallet.reserve_atomic(
            onchain.asset,
            offer.amount,
            onchain.decimals,
            payee,
            aliases=(offer.token,),
            payee_aliases=(offer.pay_to,),
        )
        try:
            header = evm.sign_exact(offer.offer, offer.resource)
        except BaseException:
            reservation.release()
            raise
        request.headers.pop(PROOF_HEADER, None)  # a refused prepaid proof must not ride along
        request.headers[SIGNATURE_HEADER] = header
        resource = f"{request.method} {path_of(request.url)}"
        return _ExactPayment(reservation, onchain, offer.amount, evm.address, resource)

    def _settle_exact(
        self, payment: _ExactPayment, response: httpx.Response, discovery: Discovery | None
    ) -> None:
        header = receipt_header(response)
        if header is None:
            if 400 <= response.status_code < 500:
                payment.reservation.release()  # refused before anything settled
                return
            # A 5xx may come after the chain moved the money; a 2xx did pay.
            payment.reservation.commit()
            if response.status_code < 400:
                message = f"{response.status_code} response carries no payment receipt"
                bad_receipt(message, self.strict, response)
            return
        payment.reservation.commit()
        fields = receipt_fields(header)
        if fields is None:
            bad_receipt(NOT_JSON, self.strict, response)
            return
        problem = check_exact_receipt(
            fields,
            self._keys(discovery),
            payer=payment.payer,
            resource=payment.resource,
            asset=payment.onchain.asset,
            atomic=payment.amount,
            decimals=payment.onchain.decimals,
        )
        problem = self._worded(problem)
        report(attach(response, fields, problem), problem, self.strict, response)

    # -- auto top-up -----------------------------------------------------------------------
    def _cures(self, reason: str) -> bool:
        return self.auto_topup is not None and reason in TOPUP_REASONS

    def _topup_and_retry(
        self, request: httpx.Request, refused: httpx.Response, generation: int
    ) -> Flow:
        """Buy credit (or wait for the top-up another request started), then retry once
        with a fresh prepaid proof. `generation`: the state of top-ups when the refused
        proof was signed; a top-up finished since then is used, not repeated."""
        assert self.auto_topup is not None
        origin = origin_of(request.url)
        discovery = self.discoveries.last(origin)  # stale or not: its top-up terms are ours
        if discovery is None or discovery.topup is None:
            return  # this gateway sells no credit: the refusal stands
        state = self._topup_state(origin)
        with state.lock:
            if state.generation != generation:
                running, run = None, False  # credit was bought since: just retry
            elif state.running is None:
                running, run = threading.Event(), True
                state.running = running
            else:
                running, run = state.running, False
        topup = None
        if run:
            assert running is not None
            try:
                topup = yield from topup_flow(
                    self.wallet, origin, self.auto_topup, discovery, self._keys(discovery)
                )
                if not topup.verified:
                    message = f"top-up receipt {topup.receipt_id or '?'}: {topup.problem}"
                    bad_receipt(message, self.strict)
                with state.lock:
                    state.generation += 1
            finally:
                with state.lock:
                    state.running = None
                running.set()
        elif running is not None:
            yield Wait(running, self.topup_timeout)
            if state.generation == generation:
                return  # that top-up failed, or is late: the refusal stands
        # The retry: a fresh proof, direct from the price list or the refusal's invoice.
        price = discovery.price(request.method, path_of(request.url)) if self.direct else None
        if price is not None:
            terms = self._direct_terms(request, price, discovery)
        else:
            invoice = parse_invoice(refused)
            resource = f"{request.method} {path_of(request.url)}"
            if invoice is None or invoice["resource"] != resource:
                return
            terms = invoice
        payment = self._pay(request, terms)
        response = yield from _send_paid(request, payment)
        self._settle(payment, response, discovery)
        if topup is not None:
            response.extensions = {**response.extensions, TOPUP_EXTENSION: topup}


def _carry(request: httpx.Request, final: httpx.Response) -> None:
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


def check_receipt(
    fields: Mapping[str, Any], proof: Mapping[str, Any], keys: Mapping[str, str] | None
) -> str | None:
    """Why this receipt is not a valid receipt for `proof`, or None if it is one."""
    if keys is None:
        return "no gateway keys to verify it (the gateway has no /.well-known/x402)"
    if not protocol.verify_receipt(fields, keys):
        return "the signature does not verify against the gateway's published keys"
    for name in ("payer", "payee", "nonce", "resource", "asset"):
        if fields.get(name) != proof.get(name):
            return f"its {name} is not the one paid"
    try:
        paid = scaled(str(proof.get("amount")))
        amount = scaled(str(fields.get("amount")))
        # a hold: what was held is what was paid, and at most that was captured
        held = fields.get("held") if fields.get("success") is True else fields.get("released")
        held_amount = None if held is None else scaled(str(held))
    except AmountError:
        return "its amount is not the amount paid"
    if fields.get("success") is not True:
        if fields.get("success") is False and held_amount == paid and amount == 0:
            return None  # the service failed: the hold was released, nothing charged
        return "it does not say success"
    if held_amount is None and amount != paid:
        return "its amount is not the amount paid"
    if held_amount is not None and not (held_amount == paid and 0 <= amount <= paid):
        return "its captured amount is not within the amount held"
    return None
