"""Agents pay with httpx: `X402Auth` answers 402 challenges, or pays from the price list.

    auth = X402Auth(Wallet.from_env(max_amount="1", budget="10"))
    response = httpx.get(url, auth=auth)
    response.extensions["x402_receipt"]  # the verified Receipt

One `auth_flow` generator serves sync and async httpx (as httpx's DigestAuth does). Every
piece of per-request state lives in the generator, so one auth object can be shared by
threads and by hundreds of concurrent tasks; the only shared state is the wallet (locked)
and the discovery cache (one dict assignment per refresh).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar.agent.wallet import Reservation, Wallet, scaled
from sidecar.core import protocol
from sidecar.core.errors import (
    AmountError,
    InvalidChallenge,
    InvalidReceipt,
    PaymentError,
    ReceiptWarning,
)
from sidecar.core.money import Asset
from sidecar.core.pricing import Price, Route, RouteTable, validate_path
from sidecar.core.protocol import SCHEME, VERSION

# Re-exported so an agent needs one import line.
__all__ = ["RECEIPT_EXTENSION", "Discovery", "Receipt", "Wallet", "X402Auth", "receipt_of"]

RECEIPT_EXTENSION = "x402_receipt"
PROOF_HEADER = "X-Payment"
# A direct proof refused for one of these means the price list is stale: pay the challenge.
FALLBACK_REASONS = frozenset({"invoice_mismatch", "invoice_expired", "payment_required"})
# An invoice carries what a proof echoes back, without the payer's name and signature.
INVOICE_FIELDS = {
    name: kind for name, kind in protocol.PROOF_FIELDS.items() if name not in ("payer", "signature")
}


@dataclass(frozen=True)
class Receipt:
    """The gateway's signed receipt for one payment, as the client checked it."""

    receipt_id: str
    payer: str
    payee: str
    resource: str
    asset: str
    amount: str
    balance: str  # the payer's ledger balance after this payment
    nonce: str
    invoice_id: str  # "" for a direct payment
    issued_at: int
    kid: str
    verified: bool  # signature valid for the gateway's key *and* it is for this payment
    fields: Mapping[str, Any] = field(repr=False)
    # A route charged on success: `amount` is what was captured of the `held` amount (a
    # metered route: `units` of it); `success` False: the service failed, nothing was
    # charged (`released`), and the same payment may be retried.
    success: bool = True
    held: str = ""
    units: int | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], verified: bool) -> Receipt:
        def text(name: str) -> str:
            value = fields.get(name, "")
            return value if isinstance(value, str) else str(value)

        issued = fields.get("issued_at")
        return cls(
            receipt_id=text("receipt_id"),
            payer=text("payer"),
            payee=text("payee"),
            resource=text("resource"),
            asset=text("asset"),
            amount=text("amount"),
            balance=text("balance"),
            nonce=text("nonce"),
            invoice_id=text("invoice_id"),
            issued_at=issued if type(issued) is int else 0,
            kid=text("kid"),
            verified=verified,
            fields=dict(fields),
            success=fields.get("success") is True,
            held=text("held") or text("released"),
            units=fields["units"] if type(fields.get("units")) is int else None,
        )


@dataclass(frozen=True)
class Discovery:
    """A gateway's `/.well-known/x402`: its payee, its keys and its price list."""

    payee: str
    keys: dict[str, str]  # kid → base64url public key
    routes: RouteTable
    max_direct_ttl: int

    @classmethod
    def parse(cls, doc: Any) -> Discovery | None:
        """None when the document is not a usable fth-x402/2.0 discovery document."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            return None
        payee, ttl = doc.get("payee"), doc.get("max_direct_ttl_seconds")
        if not isinstance(payee, str) or type(ttl) is not int:
            return None
        keys = {
            k["kid"]: k["public_key"]
            for k in doc.get("keys") or []
            if isinstance(k, dict)
            and isinstance(k.get("kid"), str)
            and isinstance(k.get("public_key"), str)
        }
        assets = {
            a["asset"]: Asset(a["asset"], a["decimals"])
            for a in doc.get("assets") or []
            if isinstance(a, dict)
            and isinstance(a.get("asset"), str)
            and type(a.get("decimals")) is int
            and 0 <= a["decimals"] <= 18
        }
        routes = []
        for spec in doc.get("routes") or []:
            route = _route(spec, assets)
            if route is not None:
                routes.append(route)
        default = next(iter(assets), "USDF")
        return cls(payee, keys, RouteTable(routes, assets, default), ttl)

    def price(self, method: str, path: str) -> Price | None:
        """The same matcher the sidecar uses, over the published price list (None: free)."""
        price = self.routes.lookup(method, path)
        return price if price is not None and price.amount else None


def _route(spec: Any, assets: Mapping[str, Asset]) -> Route | None:
    """One price-list entry, or None if it is not one we can pay from (skipped, not fatal)."""
    if not isinstance(spec, dict):
        return None
    method, path, price, code = (spec.get(k) for k in ("method", "path", "price", "asset"))
    if not all(isinstance(v, str) for v in (method, path, price, code)):
        return None
    asset = assets.get(str(code))
    if asset is None:
        return None
    try:
        validate_path(str(path))
        amount = asset.to_atomic(str(price))
    except (ValueError, AmountError):
        return None
    if amount == 0:
        return None
    name = f"{method} {path}"
    return Route(name, str(method), str(path), Price(name, amount, asset))


@dataclass(frozen=True)
class _Cached:
    discovery: Discovery | None  # None: the origin has no usable discovery document
    expires: float


@dataclass
class _Payment:
    """One signed proof in flight; lives only inside one auth_flow generator."""

    reservation: Reservation
    proof: dict[str, Any]


def receipt_of(response: Any) -> Receipt | None:
    """The verified receipt of an httpx or requests response paid through this SDK."""
    extensions = getattr(response, "extensions", None)
    if isinstance(extensions, Mapping) and RECEIPT_EXTENSION in extensions:
        receipt = extensions[RECEIPT_EXTENSION]
        return receipt if isinstance(receipt, Receipt) else None
    receipt = getattr(response, RECEIPT_EXTENSION, None)
    return receipt if isinstance(receipt, Receipt) else None


def origin_of(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def path_of(url: httpx.URL) -> str:
    """The path as sent on the wire, without the query: what `resource` names."""
    return url.raw_path.decode("ascii").partition("?")[0]


def refusal(response: httpx.Response) -> str | None:
    """The gateway's reason when it refused a payment (nothing was charged), else None."""
    if response.status_code < 400 or _receipt_header(response) is not None:
        return None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    reason = body.get("error") if isinstance(body, dict) else None
    # Envoy adds the receipt to every allowed response, so a denial without one is unpaid.
    return reason if isinstance(reason, str) else f"http_{response.status_code}"


def _receipt_header(response: httpx.Response) -> str | None:
    for name in protocol.RECEIPT_HEADERS:
        if name in response.headers:
            return response.headers[name]
    return None


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
    for name, kind in INVOICE_FIELDS.items():
        if type(invoice.get(name)) is not kind:
            raise InvalidChallenge(f"the 402's invoice has no valid {name!r}")
    if invoice["version"] != VERSION or invoice["scheme"] != SCHEME:
        raise InvalidChallenge(
            f"cannot pay a {invoice['version']}/{invoice['scheme']} invoice "
            f"(this client speaks {VERSION}/{SCHEME})"
        )
    return {name: invoice[name] for name in INVOICE_FIELDS}


class X402Auth(httpx.Auth):
    """httpx auth that pays for requests with a Wallet, at most once per request.

    - direct=True: with the gateway's price list (fetched once per origin from
      /.well-known/x402, cached `discovery_ttl` seconds) a priced request carries its proof
      on the first try: one round trip. A stale price list costs one 402, a refresh and
      the challenge's payment; never a second charge.
    - Otherwise, or for a route the price list does not know, a 402 is answered by signing
      its invoice and retrying once.
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
    ) -> None:
        self.wallet = wallet
        self.direct = direct
        self.strict = strict
        self.discovery_ttl = discovery_ttl
        self.direct_ttl = direct_ttl
        # Pinned receipt keys ({kid: public key}) instead of trusting discovery's.
        self.gateway_keys = dict(gateway_keys) if gateway_keys is not None else None
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = threading.Lock()

    # -- discovery cache -------------------------------------------------------------------
    def _cached(self, origin: str) -> _Cached | None:
        entry = self._cache.get(origin)
        return entry if entry is not None and entry.expires > time.monotonic() else None

    def _store(self, origin: str, response: httpx.Response) -> Discovery | None:
        discovery = None
        if response.status_code == 200:
            try:
                discovery = Discovery.parse(response.json())
            except (ValueError, UnicodeDecodeError):
                discovery = None
        # Retry a missing document sooner than a good one goes stale.
        ttl = self.discovery_ttl if discovery is not None else min(self.discovery_ttl, 30.0)
        with self._cache_lock:
            self._cache[origin] = _Cached(discovery, time.monotonic() + ttl)
        return discovery

    def forget(self, origin: str | None = None) -> None:
        """Drop cached discovery documents (all, or one origin like http://host:port)."""
        with self._cache_lock:
            if origin is None:
                self._cache.clear()
            else:
                self._cache.pop(origin, None)

    @staticmethod
    def _discovery_request(request: httpx.Request) -> httpx.Request:
        url = request.url.copy_with(path=protocol.DISCOVERY_PATH, query=None, fragment=None)
        return httpx.Request("GET", url, headers={"accept": "application/json"})

    # -- the flow --------------------------------------------------------------------------
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        origin = origin_of(request.url)
        cached = self._cached(origin)
        discovery = cached.discovery if cached is not None else None
        if self.direct and cached is None:
            discovery = self._store(origin, (yield self._discovery_request(request)))
            cached = self._cached(origin)

        payment = None
        if self.direct and discovery is not None:
            price = discovery.price(request.method, path_of(request.url))
            if price is not None:
                payment = self._pay(request, self._direct_terms(request, price, discovery))
        response = yield request

        if payment is not None:
            reason = refusal(response)
            if reason is None:
                self._settle(payment, response, discovery)
                return
            payment.reservation.release()  # refused: nothing was charged
            if response.status_code != 402 or reason not in FALLBACK_REASONS:
                return
            # The price list is stale: refresh it, then pay the invoice this 402 carries.
            discovery = self._store(origin, (yield self._discovery_request(request)))
            cached = self._cached(origin)
        elif response.status_code != 402:
            return

        invoice = parse_invoice(response)
        if invoice is None:
            return  # a 402 that is no x402 challenge: the caller gets it as it is
        resource = f"{request.method} {path_of(request.url)}"
        if invoice["resource"] != resource:
            raise InvalidChallenge(
                f"the invoice is for {invoice['resource']!r}, not {resource!r}; not paying"
            )
        if cached is None:  # challenge mode: the keys that check the receipt
            discovery = self._store(origin, (yield self._discovery_request(request)))
        payment = self._pay(request, invoice)
        response = yield request
        self._settle(payment, response, discovery)

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
        return _Payment(reservation, proof)

    def _settle(
        self, payment: _Payment, response: httpx.Response, discovery: Discovery | None
    ) -> None:
        header = _receipt_header(response)
        if header is None:
            if response.status_code >= 400:
                payment.reservation.release()  # a denial: the gateway charged nothing
                return
            # Success without a receipt: we may have paid, so it counts against the budget.
            payment.reservation.commit()
            self._bad_receipt(f"{response.status_code} response carries no payment receipt")
            return
        try:
            fields = protocol.decode_header(header)
        except PaymentError:
            fields = None
        if not isinstance(fields, dict):
            payment.reservation.commit()
            self._bad_receipt("the payment receipt header is not base64 JSON")
            return
        keys = self.gateway_keys
        if keys is None and discovery is not None:
            keys = discovery.keys
        problem = check_receipt(fields, payment.proof, keys)
        # A verified receipt of a hold says what was really charged: the budget gets the
        # rest back (all of it when the service failed and the hold was released).
        captured = None
        if problem is None and ("held" in fields or fields.get("success") is False):
            captured = scaled(str(fields["amount"]))
        if captured == 0 and fields.get("success") is False:
            payment.reservation.release()
        else:
            payment.reservation.commit(captured)
        receipt = Receipt.from_fields(fields, verified=problem is None)
        response.extensions = {**response.extensions, RECEIPT_EXTENSION: receipt}
        if problem is not None:
            self._bad_receipt(f"receipt {receipt.receipt_id or '?'}: {problem}")

    def _bad_receipt(self, message: str) -> None:
        if self.strict:
            raise InvalidReceipt(message)
        warnings.warn(message, ReceiptWarning, stacklevel=2)


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
