"""Envoy's ext_authz: the facts of one request → pricing, decision, ledger → the answer.

The hot path of the product, behind either transport Envoy offers: gRPC (the default;
grpc_transport.py) or plain HTTP (http_transport.py). Both hand `decide` the same `Facts`
and an `Answers` encoder of their wire format, so the decision code is one. It stays lean:
routes and prices are precompiled, verify keys cached (core/decision.py), the answer is
concatenated from prebuilt pieces (grpc_answers.py, http_transport.py) and sent as bytes,
the decision line skips structlog's processor chain (logs.DecisionLog), and the ledger step
is one pipelined EVALSHA (ledger/accounts.py). Each payment kind is one module of
server/schemes/; this module alone writes the decision line and counts revenue.

Envoy may stop waiting for a check (its timeout, or the client went away). Once the ledger
step started it runs to its end, and `_pay` finishes its bookkeeping in this one place: the
decision line (which then says `cancelled`), and for a hold, the scheme's `abandon` (keep
it until it expires, or free it). The ledger scripts refuse past Envoy's deadline, so a
check Envoy answered 503 charged nothing. gRPC cancels the check's coroutine: the paid part
is shielded (`Facts.cancels`); over HTTP nothing cancels it and the connection says whether
Envoy is still there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sidecar.core import decision, exact, phases, protocol, retries
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    ConfigError,
    InternalError,
    PaymentError,
    PaymentRequired,
    UnsupportedScheme,
)
from sidecar.core.mcp import Call
from sidecar.core.pricing import Price, RouteTable
from sidecar.core.retries import Retry
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.rate_limit import RateLimiter
from sidecar.server import metrics, replays
from sidecar.server.authz import mcp_calls
from sidecar.server.authz.grpc_answers import GrpcAnswers
from sidecar.server.authz.mcp_calls import McpCalls
from sidecar.server.envoy import contract
from sidecar.server.envoy.contract import FORWARDED_HOST
from sidecar.server.logs import DecisionLog, get_logger
from sidecar.server.paywall import Paywall, wants_html
from sidecar.server.schemes import base
from sidecar.server.schemes.base import Charged, Held, HoldingScheme, Payment, Scheme
from sidecar.server.schemes.registry import Schemes
from sidecar.server.settler import ExactSettler

log = get_logger("sidecar.authz")
REDELIVERED = "redelivered"  # the decision line's reason for a retry served uncharged
REPLAYED = "replayed"  # ... for one answered with its recorded response (server/replays.py)


def _here() -> bool:
    return False


def _gone() -> bool:
    return True


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
    # Whether Envoy stopped waiting for this check (HTTP: the connection closed).
    gone: Callable[[], bool] = _here
    # True where the transport cancels the check's coroutine when Envoy gives up (gRPC):
    # the paid part then runs shielded, and `gone` turns true.
    cancels: bool = False
    query: str = ""  # the request's query string, without the `?`
    body: bytes = b""  # the request body, on MCP routes only (Envoy's with_request_body)

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


def access_metadata(receipt: Mapping[str, Any], price: Price) -> dict[str, str]:
    """For Envoy's access log (%DYNAMIC_METADATA(envoy.filters.http.ext_authz:payer)%)."""
    return {
        "payer": receipt["payer"],
        "amount": receipt["amount"],
        "asset": price.asset.code,
        "receipt_id": receipt["receipt_id"],
    }


@dataclass(slots=True)
class Paying:
    """One check past every check before the ledger: what its ledger step needs."""

    scheme: Scheme[Any]
    holder: HoldingScheme[Any] | None  # the hold step, on a route charged on success
    payment: Payment[Any]
    price: Price
    request: Request
    line: dict[str, Any]
    now: int
    started: float
    call: Call | None = None  # on an MCP route: the JSON-RPC tools/call it pays


class CheckService:
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
        paywall: Paywall | None = None,
    ) -> None:
        self.routes = routes
        self.gateway = gateway
        self.ledger = ledger
        self.worker = worker
        self.decisions = decisions or DecisionLog()
        self.limiter = limiter  # None: no rate limits, not even a call
        self.answers: Answers = answers or GrpcAnswers()
        self.schemes = Schemes(gateway, ledger, settler)
        self.paywall = paywall  # None: browsers get the JSON 402 like every client
        self._finishing: set[asyncio.Future[bytes]] = set()  # paid checks Envoy left
        self.mcp = McpCalls(gateway, self.answers)  # MCP routes: JSON-RPC priced by tool

    async def decide(self, facts: Facts) -> bytes:
        started = time.perf_counter()
        headers = facts.headers
        request = Request(
            method=facts.method,
            path=facts.path,
            host=decision.request_host(
                facts.host, headers.get(FORWARDED_HOST), self.gateway.trusted_proxies
            ),
            scheme=facts.scheme,
            proof_header=headers.get("x-payment") or headers.get("payment-signature"),
            query=facts.query,
        )
        line: dict[str, Any] = {
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
        now = int(time.time())
        price = None
        try:
            price = self.routes.price_for(request.method, request.path, facts.extensions)
            if price is not None and price.mcp is not None:
                return await self._mcp(facts, request, price, line, now, started)
            if price is None:
                line.update(decision="allow", status=200, reason="free")
                answer = self.answers.free
            else:
                paying = await self._verify(request, price, facts, line, now, started)
                if facts.cancels:
                    return await self._shielded(self._pay(paying, facts), facts)
                return await self._pay(paying, facts)
        except Exception as error:
            browser = isinstance(error, PaymentRequired) and wants_html(headers.get("accept"))
            answer = self._refuse(error, request, price, line, now, browser)
        self._record(line, price, 0, started, facts)
        return answer

    async def _verify(
        self,
        request: Request,
        price: Price,
        facts: Facts,
        line: dict[str, Any],
        now: int,
        started: float,
    ) -> Paying:
        """Every check before the ledger; raises the refusal."""
        if request.proof_header is None:
            raise decision.unpaid(request, price)
        max_bytes = self.gateway.max_proof_bytes
        decoded, payment_id = protocol.decode_paid(request.proof_header, max_bytes)
        scheme = self.schemes.pick(exact.scheme_of(decoded))
        payment = scheme.verify(decoded, request, price, now)
        if payment_id is not None and payment.retry is not None:  # the client names it
            retry = Retry(retries.identity(payment_id, ""), payment.retry.fingerprint)
            payment = dataclasses.replace(payment, retry=retry)
        line["payer"], line["invoice_id"] = payment.payer, payment.invoice_id
        line.update(payment.facts)
        if self.limiter is not None:  # before the ledger: a refused check charges nothing
            await self.limiter.check(payment.payer, facts.peer, payment.nonce)
        holder = None
        if price.phase is not None:  # charge: on_success (core/phases.py)
            holder = self._holder(scheme, price, facts.extensions)
        return Paying(scheme, holder, payment, price, request, line, now, started)

    async def _mcp(
        self,
        facts: Facts,
        request: Request,
        price: Price,
        line: dict[str, Any],
        now: int,
        started: float,
    ) -> bytes:
        """An MCP route (server/authz/mcp_calls.py): the JSON-RPC body's tools/call of a
        priced tool pays as its own resource; any other method passes free."""
        call = self.mcp.accepting(facts)
        try:
            call = self.mcp.parse(facts, price, call)
            line["mcp_method"], line["tool"] = call.method[:64] or None, call.tool
            priced = None if call.tool is None else mcp_calls.tool_price(price, call.tool)
            if priced is None or call.tool is None:
                line.update(decision="allow", status=200, reason="free")
                self._record(line, replace(price, amount=0), 0, started, facts)
                return self.mcp.free(call, price)
            tool_request = self.mcp.tool_request(request, call, call.tool)
            paying = await self._verify(tool_request, priced, facts, line, now, started)
            paying.call = call
        except Exception as error:
            answer = self._refuse(error, request, price, line, now, call=call)
            # the line names the tool's price where the call named a priced tool
            tool = None if call.tool is None else mcp_calls.tool_price(price, call.tool)
            self._record(line, tool or replace(price, amount=0), 0, started, facts)
            return answer
        if facts.cancels:
            return await self._shielded(self._pay(paying, facts), facts)
        return await self._pay(paying, facts)

    async def _shielded(self, paying: Coroutine[Any, Any, bytes], facts: Facts) -> bytes:
        """The paid part of a check whose transport cancels it when Envoy gives up: it runs
        to its end all the same, and its line says `cancelled`."""
        task = asyncio.ensure_future(paying)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            facts.gone = _gone
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
            raise

    async def _pay(self, paying: Paying, facts: Facts) -> bytes:
        """The ledger step and its bookkeeping, in one place whether or not Envoy still
        waits: the answer, the decision line and the revenue."""
        scheme, price, line = paying.scheme, paying.price, paying.line
        charged = 0
        try:
            if paying.holder is not None:
                answer, charged = await self._hold(paying.holder, paying, facts)
            else:
                done = await scheme.charge(paying.payment, price, paying.now, facts.within())
                answer = self._allow(scheme, done, price, line, call=paying.call)
                charged = done.amount
        except Exception as error:
            answer = self._refuse(error, paying.request, price, line, paying.now, call=paying.call)
        self._record(line, price, charged, paying.started, facts)
        return answer

    async def _hold(
        self, holder: HoldingScheme[Any], paying: Paying, facts: Facts
    ) -> tuple[bytes, int]:
        """The hold step: the answer, and what it charged (a payment resolved settled)."""
        price = paying.price
        assert price.phase is not None
        paying.line["phase"] = "check"
        held = await holder.hold(paying.payment, price, price.phase, paying.now, facts.within())
        if isinstance(held, Charged) and held.response is not None:  # its kept response
            return self._replay(held, held.response, paying.line), 0
        if isinstance(held, Charged):  # a captured payment again: redelivered, no hold
            # the response phase still strips the service's usage header
            usage = {phases.EXT_USAGE_HEADER: price.phase.usage_header}
            return self._allow(paying.scheme, held, price, paying.line, usage), held.amount
        if facts.gone():  # no response phase will come for it
            refusal = await holder.abandon(held, paying.payment)
            if refusal is not None:
                raise refusal
        return self._allow_held(held, paying), 0

    def _refuse(
        self,
        error: Exception,
        request: Request,
        price: Price | None,
        line: dict[str, Any],
        now: int,
        browser: bool = False,
        call: Call | None = None,
    ) -> bytes:
        """Any failure is a refusal: a bug must never let a request through. `browser`: an
        unpaid request whose Accept prefers HTML, answered with the paywall's page."""
        if isinstance(error, ConfigError):  # a bad price annotation in Envoy's config
            error = InternalError(str(error))
        elif not isinstance(error, PaymentError):
            log.exception("authz.error", method=request.method, path=request.path)
            error = InternalError("the payment check failed; try again")
        assert isinstance(error, PaymentError)
        denial = decision.deny(error, request, price, self.gateway, now)
        if browser and self.paywall is not None and price is not None:
            page = self.paywall.answer(denial, request, price)
            if page is not None:
                denial, line["paywall"] = page, True
        line.update(
            decision="deny", status=denial.status, reason=denial.reason, balance=denial.balance
        )
        line.update(error.logged)
        line["invoice_id"] = line["invoice_id"] or denial.invoice_id
        if call is not None:  # an MCP route: the x402 MCP convention's answer
            answered = self.mcp.refusal(call, error, request, price, now)
            if answered is not None:
                return self.answers.denied(*answered)
        return self.answers.denied(denial.status, denial.headers, denial.body)

    def _record(
        self,
        line: dict[str, Any],
        price: Price | None,
        charged: int,
        started: float,
        facts: Facts,
    ) -> None:
        if facts.gone():
            line["cancelled"] = True
        elapsed = time.perf_counter() - started
        line["latency_ms"] = round(elapsed * 1000, 3)
        metrics.record(line, price, charged, elapsed)
        if price is not None:
            line["route"], line["price"] = price.route, price.display
            line["asset"] = price.asset.code
        self.decisions.write(line)

    def _holder(
        self, scheme: Scheme[Any], price: Price, extensions: Mapping[str, str]
    ) -> HoldingScheme[Any] | None:
        """The hold step for this payment, or None to charge on check. A hold is placed only
        when Envoy says this route runs the response phase (the `x402.phase` annotation the
        renderer writes beside the response phase): otherwise nothing would capture it, and
        the response would go out free. A metered route cannot be charged on check."""
        assert price.phase is not None
        holder = self.schemes.holding.get(scheme.name)
        responds = extensions.get(phases.EXT_PHASE) == phases.PHASE_RESPONSE
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
                f"(Envoy's response phase, annotation {phases.EXT_PHASE}) or scheme"
            )
        return None

    def _replay(self, charged: Charged, kept: replays.Recorded, line: dict[str, Any]) -> bytes:
        """A retry of a payment whose response was kept: the gateway answers it, with the
        payment's receipt; the service does not run again, nothing is charged."""
        line["decision"], line["status"], line["reason"] = "allow", kept.status, REPLAYED
        line["receipt_id"], line["balance"] = charged.receipt["receipt_id"], charged.balance
        headers = replays.answer_headers(kept, charged.receipt, charged.header, charged.settlement)
        return self.answers.denied(kept.status, headers, kept.body)

    def _allow_held(self, held: Held, paying: Paying) -> bytes:
        """Allow with a hold: the service hears of it; the client's receipt comes with the
        response (server/processing/), stating what was captured."""
        line, price, payment = paying.line, paying.price, paying.payment
        line["decision"], line["status"], line["reason"] = "allow", 200, "held"
        line["receipt_id"], line["balance"] = held.hold_id, held.balance
        upstream = (
            (decision.UPSTREAM_PAYER, held.payer or payment.payer),
            (decision.UPSTREAM_AMOUNT, price.display),
            (decision.UPSTREAM_RECEIPT, held.hold_id),
            (decision.UPSTREAM_HOLD, "true"),  # x-x402-amount is the hold, not the charge
        )
        meta = base.metadata(held, payment, paying.scheme.name, price, line["request_id"])
        if paying.call is not None:  # the response phase reads the tool's answer
            meta[contract.MCP] = contract.MCP_CALL
        return self.answers.ok(upstream, (), meta)

    def _allow(
        self,
        scheme: Scheme[Any],
        charged: Charged,
        price: Price,
        line: dict[str, Any],
        extra: Mapping[str, str] | None = None,
        call: Call | None = None,
    ) -> bytes:
        reason = REDELIVERED if charged.redelivered else scheme.reason
        line["decision"], line["status"], line["reason"] = "allow", 200, reason
        line["receipt_id"], line["balance"] = charged.receipt["receipt_id"], charged.balance
        allowed = decision.carrying(charged.receipt, charged.header, charged.settlement)
        metadata = access_metadata(allowed.receipt, price)
        if extra:
            metadata.update(extra)
        if call is not None:  # an MCP route: the settlement goes into the tool's result
            metadata.update(self.mcp.allow_metadata(charged, price))
        return self.answers.ok(allowed.upstream_headers, allowed.response_headers, metadata)
