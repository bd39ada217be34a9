"""Envoy's ext_authz: the facts of one request → pricing, decision, ledger → the answer.

The hot path of the product, behind either transport Envoy offers: gRPC (`Check`, the
default; this module) or plain HTTP (http_authz.py). Both hand `decide` the same `Facts` and
an `Answers` encoder of their wire format, so the decision code is one. It stays lean:
routes and prices are precompiled, verify keys cached (decision.py), the answer is
concatenated from prebuilt pieces (responses.py, http_authz.py) and sent as bytes, the
decision line skips structlog's processor chain (logs.DecisionLog), and the ledger step is
one pipelined EVALSHA (ledger/accounts.py). Each payment scheme is one object of
schemes.py; this module alone writes the decision line and counts revenue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as authz

from sidecar.core import decision, exact, holds, protocol
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    ConfigError,
    InternalError,
    PaymentError,
    PaymentRequired,
    UnsupportedScheme,
)
from sidecar.core.pricing import Price, RouteTable
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.rate_limit import RateLimiter
from sidecar.server import holding, metrics, responses, schemes
from sidecar.server.envoy.contract import AMOUNT, ASSET, PAYER, RECEIPT_ID
from sidecar.server.holding import Held, HoldingScheme
from sidecar.server.logs import DecisionLog, get_logger
from sidecar.server.schemes import Charged, ExactSettler, Payment, Scheme

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
log = get_logger("sidecar.authz")


@dataclass(slots=True)
class Facts:
    """What one check knows of its request, whichever transport brought it."""

    method: str
    path: str  # without the query string
    host: str
    scheme: str
    headers: Mapping[str, str]  # lower-case names: the proofs, the request id
    extensions: Mapping[str, str]  # the route's annotations (gRPC context_extensions)
    peer: str  # the client's address as Envoy saw it, for the rate limiter
    deadline: float | None = None  # perf_counter() when Envoy stops waiting, if known
    # True once Envoy hung up on a check whose coroutine still runs (HTTP: nothing cancels
    # it; gRPC cancels the coroutine and `late` callbacks take over instead).
    abandoned: Callable[[], bool] | None = None

    def within(self) -> float | None:
        """Seconds until Envoy stops waiting for this check, if it said."""
        return None if self.deadline is None else self.deadline - time.perf_counter()


class Answers(Protocol):
    """A transport's encoder of the three answers, from prebuilt pieces, as bytes."""

    free: bytes  # allow, nothing charged; the client's proof and x-x402-* headers stripped

    def ok(
        self,
        upstream: Iterable[tuple[str, str]],
        response: Iterable[tuple[str, str]],
        metadata: Mapping[str, str],
    ) -> bytes:
        """Allow: headers for the service, for the client's response, and dynamic metadata
        (Envoy's access log, the response phase); the proof headers are stripped."""
        ...

    def denied(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        """Envoy answers the client itself with this status, headers and body."""
        ...


class GrpcAnswers:
    """ext_authz v3 CheckResponse bytes (responses.py)."""

    # Proof headers are bearer material: stripped before any request, free or paid, goes on.
    _REMOVE_PROOFS = responses.removals(protocol.PROOF_HEADERS)
    # What the gateway asserts to the service is never the client's word: on a free request
    # it is removed (Envoy strips every x-x402-* at the edge too); a paid one overwrites it.
    free = responses.ok(
        remove_headers=_REMOVE_PROOFS + responses.removals(decision.UPSTREAM_HEADERS)
    )

    def ok(
        self,
        upstream: Iterable[tuple[str, str]],
        response: Iterable[tuple[str, str]],
        metadata: Mapping[str, str],
    ) -> bytes:
        return responses.ok(upstream, response, self._REMOVE_PROOFS, metadata)

    def denied(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        return responses.denied(status, headers, body)


def access_metadata(receipt: Mapping[str, Any], price: Price) -> dict[str, str]:
    """For Envoy's access log (%DYNAMIC_METADATA(envoy.filters.http.ext_authz:payer)%)."""
    return {
        PAYER: receipt["payer"],
        AMOUNT: receipt["amount"],
        ASSET: price.asset.code,
        RECEIPT_ID: receipt["receipt_id"],
    }


def grpc_facts(check: authz.CheckRequest, context: Any) -> Facts:
    attributes = check.attributes
    http = attributes.request.http
    remaining = None if context is None else context.time_remaining()
    return Facts(
        http.method,
        http.path.partition("?")[0],
        http.host,
        http.scheme or "http",
        http.headers,
        attributes.context_extensions,
        attributes.source.address.socket_address.address,
        None if remaining is None else time.perf_counter() + remaining,
    )


class Authorization:
    def __init__(
        self,
        routes: RouteTable,
        gateway: Gateway,
        ledger: Ledger,
        worker: int = 0,
        decisions: DecisionLog | None = None,
        limiter: RateLimiter | None = None,
        settler: ExactSettler | None = None,
        answers: Answers | None = None,
    ) -> None:
        self.routes = routes
        self.gateway = gateway
        self.ledger = ledger
        self.worker = worker
        self.decisions = decisions or DecisionLog()
        self.limiter = limiter  # None: no rate limits, not even a call
        self.answers: Answers = answers or GrpcAnswers()
        self.schemes = schemes.registry(gateway, ledger, settler)
        # A payment naming no scheme we know is parsed as a proof, which names the reason.
        self.default_scheme = self.schemes[protocol.SCHEME]
        # Schemes with a hold step, for routes charged on success (server/holding.py).
        self.holding = holding.registry(gateway, ledger, settler)

    def handler(self) -> grpc.GenericRpcHandler:
        """ext_authz for a grpc.aio server; `check`'s bytes go out unserialized."""
        check = grpc.unary_unary_rpc_method_handler(
            self.check, request_deserializer=authz.CheckRequest.FromString
        )
        return grpc.method_handlers_generic_handler(AUTHZ_SERVICE, {"Check": check})

    async def Check(self, check: authz.CheckRequest, context: Any = None) -> authz.CheckResponse:
        """The check as a message, for tests and tools; the server sends `check`'s bytes."""
        return authz.CheckResponse.FromString(await self.check(check, context))

    async def check(self, check: authz.CheckRequest, context: Any) -> bytes:
        """The gRPC transport: a CheckRequest in, CheckResponse bytes out."""
        return await self.decide(grpc_facts(check, context))

    async def decide(self, facts: Facts) -> bytes:
        started = time.perf_counter()
        headers = facts.headers
        request = Request(
            method=facts.method,
            path=facts.path,
            host=facts.host,
            scheme=facts.scheme,
            proof_header=headers.get("x-payment") or headers.get("payment-signature"),
        )
        entry: dict[str, Any] = {
            "request_id": headers.get("x-request-id"),
            "method": request.method,
            "path": request.path,
            "route": None,
            "price": None,
            "asset": None,
            "payer": None,
            "invoice_id": None,
            "receipt_id": None,
            "balance": None,
            "worker": self.worker,
        }
        response, price, charged = await self._decide(request, facts, entry, started)
        if facts.abandoned is not None and facts.abandoned():
            entry["cancelled"] = True
        self._record(entry, price, charged, started)
        return response

    def _record(
        self, entry: dict[str, Any], price: Price | None, charged: int, started: float
    ) -> None:
        elapsed = time.perf_counter() - started
        entry["latency_ms"] = round(elapsed * 1000, 3)
        metrics.record(entry, price, charged, elapsed)
        if price is not None:
            entry["route"], entry["price"] = price.route, price.display
            entry["asset"] = price.asset.code
        self.decisions.write(entry)

    async def _decide(
        self,
        request: Request,
        facts: Facts,
        entry: dict[str, Any],
        started: float,
    ) -> tuple[bytes, Price | None, int]:
        """The answer's bytes, the price (None: free) and the atomic units charged."""
        gateway, price = self.gateway, None
        now = int(time.time())
        try:
            price = self.routes.price_for(request.method, request.path, facts.extensions)
            if price is None:
                entry.update(decision="allow", status=200, reason="free")
                return self.answers.free, None, 0
            if request.proof_header is None:
                raise PaymentRequired(
                    f"{request.resource} costs {price.display} {price.asset.code}"
                )
            decoded = protocol.decode_payment(request.proof_header, gateway.max_proof_bytes)
            scheme = self.schemes.get(exact.scheme_of(decoded), self.default_scheme)
            payment = scheme.verify(decoded, request, price, now)
            entry["payer"], entry["invoice_id"] = payment.payer, payment.invoice_id
            entry.update(payment.facts)
            if self.limiter is not None:  # before the ledger: a refused check charges nothing
                await self.limiter.check(payment.payer, facts.peer, payment.nonce)
            if price.phase is not None:  # charge: on_success (core/holds.py)
                holder = self._holder(scheme, price, facts.extensions)
                if holder is not None:
                    answer = await self._hold(
                        holder, scheme, payment, price, request, entry, now, started, facts
                    )
                    return answer, price, 0  # revenue is counted at the capture

            def late(outcome: Charged | PaymentError) -> None:
                # Envoy gave up on this check after the ledger step left: still its line.
                entry["cancelled"] = True
                if isinstance(outcome, PaymentError):
                    self._deny(outcome, request, price, entry, now)
                    self._record(entry, price, 0, started)
                else:
                    self._allow(scheme, outcome, price, entry)
                    self._record(entry, price, outcome.amount, started)

            charged = await scheme.charge(payment, price, now, late, facts.within())
            return self._allow(scheme, charged, price, entry), price, charged.amount
        except PaymentError as error:
            return self._deny(error, request, price, entry, now), price, 0
        except ConfigError as error:  # a bad price annotation in Envoy's config: fail closed
            return self._deny(InternalError(str(error)), request, price, entry, now), price, 0
        except Exception:  # a bug must never let a request through
            log.exception("authz.error", method=request.method, path=request.path)
            failure = InternalError("the payment check failed; try again")
            return self._deny(failure, request, price, entry, now), price, 0

    def _holder(
        self, scheme: Scheme, price: Price, extensions: Mapping[str, str]
    ) -> HoldingScheme | None:
        """The hold step for this payment, or None to charge on check. A hold is placed only
        when Envoy says this route runs the response phase (the `x402.phase` annotation the
        renderer writes beside the ext_proc filter): otherwise nothing would capture it, and
        the response would go out free. A metered route cannot be charged on check."""
        assert price.phase is not None
        holder = self.holding.get(scheme.name)
        responds = extensions.get(holds.EXT_PHASE) == holds.PHASE_RESPONSE
        if responds and holder is not None:
            return holder
        if price.phase.metered and responds:  # the route can hold; this kind of payment not
            raise UnsupportedScheme(
                f"route {price.route} is metered: pay it with a prepaid proof or exact "
                f"({scheme.name} cannot hold an amount until the response)"
            )
        if price.phase.metered:
            raise ConfigError(
                f"route {price.route} is metered but has no response phase here "
                f"(Envoy's ext_proc filter, annotation {holds.EXT_PHASE}) or scheme"
            )
        return None

    async def _hold(
        self,
        holder: HoldingScheme,
        scheme: Scheme,
        payment: Payment,
        price: Price,
        request: Request,
        entry: dict[str, Any],
        now: int,
        started: float,
        facts: Facts,
    ) -> bytes:
        assert price.phase is not None
        entry["phase"] = "check"

        def late(outcome: Held | PaymentError) -> None:
            entry["cancelled"] = True
            if isinstance(outcome, PaymentError):
                self._deny(outcome, request, price, entry, now)
            else:
                self._allow_held(outcome, payment, scheme, price, entry)
            self._record(entry, price, 0, started)

        held = await holder.hold(payment, price, price.phase, now, late, facts.within())
        return self._allow_held(held, payment, scheme, price, entry)

    def _allow_held(
        self, held: Held, payment: Payment, scheme: Scheme, price: Price, entry: dict[str, Any]
    ) -> bytes:
        """Allow with a hold: the service hears of it; the client's receipt comes with the
        response (server/processor.py), stating what was captured."""
        entry["decision"], entry["status"], entry["reason"] = "allow", 200, "held"
        entry["receipt_id"], entry["balance"] = held.hold_id, held.balance
        upstream = (
            (decision.UPSTREAM_PAYER, held.payer or payment.payer),
            (decision.UPSTREAM_AMOUNT, price.display),
            (decision.UPSTREAM_RECEIPT, held.hold_id),
            (decision.UPSTREAM_HOLD, "true"),  # x-x402-amount is the hold, not the charge
        )
        meta = holding.metadata(held, payment, scheme.name, price, entry["request_id"])
        return self.answers.ok(upstream, (), meta)

    def _allow(
        self, scheme: Scheme, charged: Charged, price: Price, entry: dict[str, Any]
    ) -> bytes:
        entry["decision"], entry["status"], entry["reason"] = "allow", 200, scheme.reason
        entry["receipt_id"], entry["balance"] = charged.receipt["receipt_id"], charged.balance
        allowed = decision.carrying(charged.receipt, charged.header)
        return self.answers.ok(
            allowed.upstream_headers,
            allowed.response_headers,
            access_metadata(allowed.receipt, price),
        )

    def _deny(
        self,
        error: PaymentError,
        request: Request,
        price: Price | None,
        entry: dict[str, Any],
        now: int,
    ) -> bytes:
        denial = decision.deny(error, request, price, self.gateway, now)
        entry.update(
            decision="deny", status=denial.status, reason=denial.reason, balance=denial.balance
        )
        entry["invoice_id"] = entry["invoice_id"] or denial.invoice_id
        return self.answers.denied(denial.status, denial.headers, denial.body)
