"""Agents pay with httpx: `X402Auth` answers 402 challenges, or pays from the price list.

    auth = X402Auth(Wallet.from_env(max_amount="1", budget="10"))
    response = httpx.get(url, auth=auth)
    response.extensions["x402_receipt"]  # the verified Receipt

One `auth_flow` generator serves sync and async httpx (as httpx's DigestAuth does). Every
piece of per-request state lives in the generator, so one auth object can be shared by
threads and by hundreds of concurrent tasks; the only shared state is the wallet (locked),
the discovery cache (discovery.py, shared with ChannelAuth) and the top-up state (locked).
Proofs are built by proofs.py (as the load generator's are), a payment in flight is
accounted for by payments.py, receipts are read by receipts.py, as ChannelAuth's are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field

import httpx

from sidecar.agent.discovery import Discovery, DiscoveryCache, origin_of, path_of
from sidecar.agent.exact import (
    EXACT,
    UPTO,
    ExactOffer,
    TopUp,
    exact_offers,
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
    refusal_of,
)
from sidecar.agent.payments import (
    Checking,
    ExactPayment,
    PrepaidPayment,
    carry,
    charged_nothing,
    onchain_of,
    send_paid,
    settle_exact,
    settle_prepaid,
)
from sidecar.agent.proofs import PROOF_HEADER, direct_terms, parse_invoice, proof_header
from sidecar.agent.receipts import (
    RECEIPT_EXTENSION,
    Receipt,
    bad_receipt,
    receipt_of,
    refusal,
)
from sidecar.agent.retries import Retrying
from sidecar.agent.wallet import Wallet, scaled
from sidecar.core.errors import (
    ConfigError,
    InvalidChallenge,
)
from sidecar.core.pricing import Price
from sidecar.core.protocol import Invoice

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
# A prepaid proof refused for one of these is what a top-up cures (auto_topup).
TOPUP_REASONS = frozenset({"unknown_payer", "insufficient_funds"})
# A direct proof refused for one of these means the price list is stale: pay the challenge.
FALLBACK_REASONS = frozenset({"invoice_mismatch", "invoice_expired", "payment_required"})


@dataclass
class _TopUps:
    """Per origin: one top-up in flight at a time; `generation` counts those that worked."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0
    running: threading.Event | None = None


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
      only `exact` offered, or no Ed25519 key in the wallet; on a metered route, `upto`
      (a Permit2 authorization of the route's maximum, which needs the token approved to
      Permit2): the budget is charged what the receipt says settled.
    - auto_topup="5": a prepaid proof refused for `unknown_payer` or `insufficient_funds`
      buys that much credit on the gateway's top-up route (discovery's `topup`), paid with
      `exact` from the EVM key, then retries the request with a fresh proof, once. One
      top-up at a time per origin: requests refused meanwhile wait for it, and use it.
    - Every receipt is verified against the gateway's keys from discovery (or the pinned
      `gateway_keys`, {kid: public key}) and put in `response.extensions["x402_receipt"]`;
      a bad one raises InvalidReceipt when strict=True, else warns (ReceiptWarning).
    - The wallet's guards are checked before signing; a refusal raises a GuardRefused.
    - A paid request answered 503 without a receipt (an outcome the gateway could not
      say: `settlement_pending`, a sidecar that died) is sent again with the SAME payment,
      after Retry-After, at most `retries` times; never a newly signed one. Its budget
      stays set aside until an answer says: charged (kept) or refused (given back).
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
        retries: int = 3,
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
        if retries < 0:
            raise ConfigError("retries: 0 or more")
        self.retrying = Retrying(retries)  # the same payment again after a 503
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

    def _checking(self, discovery: Discovery | None) -> Checking:
        return Checking(self._keys(discovery), self.strict, self.gateway_keys is not None)

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
        """The payment flow under httpx.Client, each answer read inside the flow."""
        if self.requires_request_body:
            request.read()
        return drive(self._flow(request, asynchronous=False), read=True)

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
            response = yield from send_paid(request, payment, self.retrying)
        else:
            response = yield from send(request)

        if payment is not None:
            answered = answer_of(request, response)
            reason = refusal(answered)
            if reason is None or not charged_nothing(answered):
                self._settle(payment, response, discovery)  # paid, or perhaps charged
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

        offers = exact_offers(response.headers.get("payment-required"), (EXACT, UPTO))
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
        if invoice is not None and invoice.resource != resource:
            raise InvalidChallenge(
                f"the invoice is for {invoice.resource!r}, not {resource!r}; not paying"
            )
        if cached is None:  # challenge mode: the keys that check the receipt
            discovery = yield from self._discover(request, origin)

        if invoice is not None:
            generation = self._topup_state(origin).generation
            payment = self._pay(request, invoice)
            response = yield from send_paid(request, payment, self.retrying)
            self._settle(payment, response, discovery)
            reason = refusal(response)
            if reason is not None and self._cures(reason):
                yield from self._topup_and_retry(request, response, generation)
            return
        exact = self._pay_exact(request, offers, discovery)
        response = yield from send_paid(request, exact, self.retrying)
        settle_exact(exact, answer_of(request, response), self._checking(discovery))
        carry(request, response)

    def _direct_terms(self, request: httpx.Request, price: Price, discovery: Discovery) -> Invoice:
        return direct_terms(
            request.method,
            path_of(request.url),
            price.asset.code,
            price.display,
            discovery.payee,
            int(time.time()) + min(self.direct_ttl, discovery.max_direct_ttl),
        )

    def _pay(self, request: httpx.Request, terms: Invoice) -> PrepaidPayment:
        """Guards first (they raise), then sign; the proof rides on the request."""
        reservation = self.wallet.reserve(terms.asset, terms.amount, terms.payee)
        try:
            proof, header = proof_header(terms, self.wallet.identity)
        except BaseException:
            reservation.release()
            raise
        request.headers[PROOF_HEADER] = header
        return PrepaidPayment(reservation, proof, request)

    def _settle(
        self, payment: PrepaidPayment, final: httpx.Response, discovery: Discovery | None
    ) -> None:
        """Account for a payment by its answer (a redirect's first hop, when the client
        followed it: a paid 3xx is the paid answer); its receipt goes on `final` too."""
        response = answer_of(payment.request, final)
        try:
            settle_prepaid(payment, response, self._checking(discovery))
        finally:
            carry(payment.request, final)

    # -- exact -----------------------------------------------------------------------------
    def _pay_exact(
        self, request: httpx.Request, offers: list[ExactOffer], discovery: Discovery | None
    ) -> ExactPayment:
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
        upto = offer.scheme == UPTO  # the reservation is the maximum; the receipt says the rest
        return ExactPayment(reservation, onchain, offer.amount, evm.address, resource, upto)

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
            if invoice is None or invoice.resource != resource:
                return
            terms = invoice
        payment = self._pay(request, terms)
        response = yield from send_paid(request, payment, self.retrying)
        self._settle(payment, response, discovery)
        if topup is not None:
            response.extensions = {**response.extensions, TOPUP_EXTENSION: topup}
