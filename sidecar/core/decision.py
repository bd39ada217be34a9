"""The decision for one request: challenge, verify a proof, deny, or allow with a receipt.

Pure: the ledger step happens between `verify_payment` and `allow` in the servicer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from nacl.signing import VerifyKey

from sidecar.core import exact, phases, protocol, upto
from sidecar.core.errors import (
    AmountError,
    InvalidInvoice,
    InvalidSignature,
    InvoiceExpired,
    InvoiceMismatch,
    MalformedPayment,
    PaymentError,
    PaymentRequired,
    SettlementFailed,
)
from sidecar.core.identity import Identity, KeySet, verify, verify_key
from sidecar.core.pricing import Price
from sidecar.core.protocol import SCHEME, Proof

UPSTREAM_PAYER, UPSTREAM_AMOUNT, UPSTREAM_RECEIPT = (
    "x-x402-payer",
    "x-x402-amount",
    "x-x402-receipt-id",
)
# `true` on a route charged on success or metered: x-x402-amount is then the hold (the
# most this request can cost), captured or released when the response is seen.
UPSTREAM_HOLD = "x-x402-hold"
UPSTREAM_HEADERS = (UPSTREAM_PAYER, UPSTREAM_AMOUNT, UPSTREAM_RECEIPT, UPSTREAM_HOLD)
# A decision or log line keeps at most this many bytes (UTF-8) of any one string value: the
# path, method, request id and every other request-controlled field are an outsider's
# (a 55 KB path would otherwise cost 55 KB a line, in the log and the dashboard's stream).
FIELD_BYTES = 256
ELLIPSIS = "\u2026"  # "…", 3 bytes: a clipped value ends with it
TRUNCATED = "truncated"  # the line's list of the fields it clipped


@dataclass(frozen=True)
class Gateway:
    """What the gateway knows of itself: its key, its invoice secret and its limits."""

    identity: Identity = field(repr=False)
    invoice_secret: bytes = field(repr=False)
    invoice_ttl: int = 300
    max_direct_ttl: int = 300
    max_proof_bytes: int = 4096
    network: str = "fth:ledger"  # CAIP-2 shaped: the official x402 schemas require a ":"
    public_url: str = ""  # base URL agents use; derived from each request's Host when empty
    # Proxies in front of Envoy the operator trusts (edge.xff_num_trusted_hops): with any,
    # their X-Forwarded-Host names the request's host (Envoy already keeps their
    # X-Forwarded-Proto only then); with none, a client's is ignored.
    trusted_proxies: int = 0
    exact: exact.ExactTerms | None = None  # the x402 `exact` scheme, where configured
    previous: tuple[Identity, ...] = field(default=(), repr=False)  # keys before a rotation
    previous_until: int = 0  # unix seconds: proofs to a previous key refused after; 0: never
    redelivery_limit: int = 3  # retries of one charged payment served uncharged (§13)
    # A retry on a route with a response phase answered with the recorded response (§13):
    # bodies up to this many bytes, this many kept per payer at once (0: none kept).
    replay_body_max_bytes: int = 0
    replay_per_payer: int = 0
    # Each priced route's 402 `extensions` (bazaar, payment-identifier) by (route, method),
    # (route, "") for any other method, ("", "") for a route priced only by Envoy's
    # annotations; built once at start (server/listing.py).
    extensions: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    def extensions_for(self, route: str, method: str) -> Mapping[str, Any] | None:
        """The 402 `extensions` a request of `method` to `route` is declared."""
        return (
            self.extensions.get((route, method))
            or self.extensions.get((route, ""))
            or self.extensions.get(("", ""))
        )

    @cached_property
    def payee(self) -> str:
        """The current key's id: the payee of every invoice and price list."""
        return self.identity.kid

    @cached_property
    def keys(self) -> KeySet:
        return KeySet(self.identity, self.previous)

    @property
    def payees(self) -> frozenset[str]:
        """Whom a voucher may pay: the current key and the previous ones (a channel works
        until it is closed)."""
        return self.keys.kids

    def pays(self, payee: str, now: int) -> bool:
        """Whether a proof may pay `payee` at `now`: the current key, or a previous one
        during the grace period after a rotation (agents with a cached price list)."""
        if payee == self.payee:
            return True
        return payee in self.keys.kids and (not self.previous_until or now <= self.previous_until)

    @cached_property
    def payee_list(self) -> str:
        """`payees`, space-separated (the channel script's argument)."""
        return " ".join(key.kid for key in self.keys.all)

    def signer(self, payee: str) -> Identity:
        """The key that signs the receipt of a payment to `payee`: the key of that id
        (checks admit only `payees`), the current key for anything else."""
        return self.keys.by_kid.get(payee, self.identity)


@dataclass(frozen=True, slots=True)
class Request:
    """The facts of one HTTP request that the decision needs."""

    method: str
    path: str  # without the query string
    host: str = ""
    scheme: str = "http"
    proof_header: str | None = None
    query: str = ""  # after the `?`, as the client sent it: part of what a payment covers
    body_digest: str = ""  # a hash of the body where the route reads it (MCP): covered too

    @property
    def resource(self) -> str:
        return f"{self.method} {self.path}"

    def base_url(self, gateway: Gateway) -> str:
        return gateway.public_url or f"{self.scheme}://{self.host}"


_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def request_host(host: str, forwarded_host: str | None, trusted_proxies: int) -> str:
    """The host agents reached: the trusted proxy's `X-Forwarded-Host` (the entry the
    nearest of `trusted_proxies` wrote) when there is one and it is a plain host[:port],
    else the request's own Host."""
    if trusted_proxies <= 0 or not forwarded_host:
        return host
    entries = [entry.strip() for entry in forwarded_host.split(",")]
    named = entries[max(0, len(entries) - trusted_proxies)]
    return named if _HOST.fullmatch(named) else host


@dataclass(frozen=True, slots=True)
class Denial:
    status: int
    reason: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    invoice_id: str | None = None
    balance: str | None = None  # insufficient_funds says what is left


@dataclass(frozen=True, slots=True)
class Allow:
    receipt: dict[str, Any]
    upstream_headers: tuple[tuple[str, str], ...]
    response_headers: tuple[tuple[str, str], ...]


def clipped(value: str, limit: int = FIELD_BYTES) -> str | None:
    """`value` cut to at most `limit` bytes of UTF-8, ending in "…"; None if it fits."""
    if len(value) * 4 <= limit:  # no character is longer than 4 bytes: fits, unencoded
        return None
    raw = value[:limit].encode("utf-8", "surrogatepass")  # never more: a 60 KB path costs 256
    if len(raw) <= limit and len(value) <= limit:
        return None
    return raw[: limit - len(ELLIPSIS.encode())].decode("utf-8", "ignore") + ELLIPSIS


def bound(line: dict[str, Any], limit: int = FIELD_BYTES) -> None:
    """Clip every string value of a decision line in place to `limit` bytes; the line's
    `truncated` lists the fields clipped. A few dict steps a check when nothing is long."""
    cut: list[str] | None = None
    fits = limit // 4  # this many characters fit, whatever they are (clipped's fast path)
    for key, value in line.items():
        if type(value) is str and len(value) > fits:
            short = clipped(value, limit)
            if short is not None:
                line[key] = short
                cut = [*(cut or ()), key]
    if cut is not None:
        line[TRUNCATED] = cut


def invoice(request: Request, price: Price, gateway: Gateway, now: int) -> dict[str, Any]:
    """A fresh, stateless invoice: nothing is stored, the MAC makes it unforgeable."""
    issued = protocol.Invoice.issue(
        gateway.invoice_secret,
        request.resource,
        price.asset.code,
        price.display,
        gateway.payee,
        now + gateway.invoice_ttl,
    )
    return {
        **issued.terms,
        "amount_atomic": str(price.amount),
        "invoice_id": issued.invoice_id,
        "facilitator_url": f"{request.base_url(gateway)}/.well-known/x402",
        # charge: on_success: `amount` is the hold (a metered route's maximum); the
        # receipt at the response says what was captured (core/phases.py)
        **phases.describe(price.phase, price.asset),
    }


@lru_cache(maxsize=65536)
def payer_key(payer: str) -> VerifyKey:
    """A payer's verify key, parsed once per payer (ValueError if it is not a key)."""
    return verify_key(payer)


def verify_payment(
    request: Request, price: Price, gateway: Gateway, now: int, proof: Proof | None = None
) -> Proof:
    """Every check that needs no ledger, cheapest first; raises a typed PaymentError.

    `proof`: the header already parsed (the servicer decodes once to pick the scheme)."""
    if proof is None:
        assert request.proof_header is not None
        proof = protocol.parse_proof(request.proof_header, gateway.max_proof_bytes)
    if proof.resource != request.resource:
        raise InvoiceMismatch(f"proof is for {proof.resource!r}, not {request.resource!r}")
    if proof.asset != price.asset.code:
        raise InvoiceMismatch(f"this route is priced in {price.asset.code}, not {proof.asset}")
    if proof.amount != price.display:  # the usual case, the canonical string: no parsing
        try:
            amount = price.asset.to_atomic(proof.amount)
        except AmountError as exc:
            raise MalformedPayment(f"payment amount: {exc}") from None
        if amount != price.amount:
            raise InvoiceMismatch(f"this route costs {price.display} {price.asset.code} now")
    if not gateway.pays(proof.payee, now):
        raise InvoiceMismatch(
            f"proof is for payee {proof.payee!r}, this gateway is {gateway.payee!r}"
        )
    if proof.expires_at < now:
        raise InvoiceExpired("the invoice has expired; pay the fresh one")
    if proof.is_direct and proof.expires_at > now + gateway.max_direct_ttl:
        raise InvoiceExpired(f"a direct proof may expire at most {gateway.max_direct_ttl}s ahead")
    if not proof.is_direct and not protocol.invoice_matches(
        gateway.invoice_secret, proof.terms, proof.invoice_id or ""
    ):
        raise InvalidInvoice("the invoice was not issued by this gateway or was altered")
    try:
        key = payer_key(proof.payer)
    except ValueError:
        raise MalformedPayment("payer is not a base64url Ed25519 public key") from None
    if not verify(key, proof.signed_message, proof.signature):
        raise InvalidSignature("the proof signature does not verify for this payer")
    return proof


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def deny(
    error: PaymentError, request: Request, price: Price | None, gateway: Gateway, now: int
) -> Denial:
    """The denial of PROTOCOL.md §5; every 402 carries a fresh invoice so the agent can pay."""
    body: dict[str, Any] = {"error": error.reason, "message": error.message, **error.details}
    if isinstance(body.get("balance"), int) and price is not None:  # atomic → wire decimal
        body["balance"] = price.asset.to_decimal(body["balance"])
    headers = [("content-type", "application/json"), ("cache-control", "no-store")]
    invoice_id = None
    if error.status == 402 and price is not None:
        fresh = invoice(request, price, gateway, now)
        invoice_id = fresh["invoice_id"]
        onchain = gateway.exact.for_price(price) if gateway.exact is not None else None
        if onchain is not None and gateway.exact is not None:
            fresh = {**fresh, **exact.invoice_fields(onchain, price.amount, gateway.exact)}
        body["x402"] = fresh
        headers.append(
            (
                "payment-required",
                protocol.encode_header(
                    payment_required(fresh, request, price, gateway, error.reason, error.message)
                ),
            )
        )
    if isinstance(error, SettlementFailed) and error.settlement is not None:  # says so
        headers.append((protocol.PAYMENT_RESPONSE, protocol.encode_header(error.settlement)))
    if error.status == 503:
        headers.append(("retry-after", "1"))
    elif error.status == 429:  # rate_limited: when the next check may pass
        headers.append(("retry-after", str(error.details.get("retry_after", 1))))
    return Denial(
        error.status, error.reason, _json(body), tuple(headers), invoice_id, body.get("balance")
    )


def payment_required(
    fresh: dict[str, Any],
    request: Request,
    price: Price,
    gateway: Gateway,
    reason: str,
    message: str,
) -> dict[str, Any]:
    """The x402 v2 `PaymentRequired` object, so generic x402 tooling can read the challenge
    (and, where the route's asset is backed by a token on chain, pay it with `exact`)."""
    prepaid = {k: v for k, v in fresh.items() if k not in _EXACT_FIELDS}
    accepts = [
        protocol.Offer(
            SCHEME,
            gateway.network,
            str(price.amount),
            price.asset.code,
            gateway.payee,
            gateway.invoice_ttl,
            prepaid,
        ).to_wire()
    ]
    # Not on a metered route: an EIP-3009 authorization is for one fixed value, and such a
    # route charges the units served (docs/protocol.md §12).
    metered = price.phase is not None and price.phase.metered
    onchain = gateway.exact.for_price(price) if gateway.exact is not None else None
    if onchain is not None and gateway.exact is not None and not metered:
        upfront = price.phase is None  # charged on check: settled before the service runs
        accepts.append(exact.offer(onchain, price.amount, gateway.exact, upfront).to_wire())
    # `upto` where the amount is known at the response: the hold is its maximum.
    uptos = upto.offer_for(onchain, price, gateway.exact)
    accepts.extend(found.to_wire() for found in uptos)
    required: dict[str, Any] = {
        "x402Version": protocol.X402_VERSION,
        "error": reason,
        "resource": {
            "url": request.base_url(gateway) + request.path,
            "description": price.description or message,
            "mimeType": "application/json",
        },
        "accepts": accepts,
    }
    extensions = gateway.extensions_for(price.route, request.method)
    if uptos and gateway.exact is not None and gateway.exact.upto_extensions:
        extensions = {**(extensions or {}), **gateway.exact.upto_extensions}
    if extensions:
        required["extensions"] = extensions
    return required


def unpaid(request: Request, price: Price) -> PaymentRequired:
    """The refusal of a priced request that carries no payment: the 402 challenge."""
    return PaymentRequired(f"{request.resource} costs {price.display} {price.asset.code}")


_EXACT_FIELDS = frozenset(("price_usd", "token", "chain", "facilitator", "payment_target"))


def carrying(
    receipt: dict[str, Any],
    encoded: str | None = None,
    settlement: Mapping[str, Any] | None = None,
) -> Allow:
    """A signed receipt and the headers that carry it: to the service and to the client.
    `encoded`: its header value, when signing made it already (protocol.signed_receipt).
    `settlement`: an `exact` payment's SettleResponse, then PAYMENT-RESPONSE's value."""
    if encoded is None:
        encoded = protocol.encode_header(receipt)
    return Allow(
        receipt=receipt,
        upstream_headers=(
            (UPSTREAM_PAYER, receipt["payer"]),
            (UPSTREAM_AMOUNT, receipt["amount"]),
            (UPSTREAM_RECEIPT, receipt["receipt_id"]),
        ),
        response_headers=protocol.receipt_headers(encoded, settlement),
    )
