"""The response phase's decision, on routes charged on success, whichever transport brings it.

Envoy's ext_proc filter runs only on routes whose config enables it (server/envoy/routes.py),
with request headers skipped and response headers sent, over gRPC (grpc_transport.py) or
HTTP (http_transport.py), as the check's transport. The check phase (server/authz/) placed a
hold and left its facts in ext_authz's dynamic metadata, which the filter forwards here
(`metadata_options.forwarding_namespaces`). From the response's status and the usage the
service reported, core/phases.py says what to capture; the hold's scheme (server/schemes/)
captures or releases it in one ledger script, and the client's response gets the signed
receipt (PAYMENT-RESPONSE / X-Payment-Response) with the amount actually charged, and
loses the usage header. A capture that cannot happen (the hold expired, the ledger is
down) replaces the response with an error: a response is never served free. If this phase
never runs (the sidecar or Envoy died, the client went away), the hold expires and the
ledger releases it: the payer is charged only when the response was seen.

The answer is transport-free (Continue or Immediate); each transport writes it its way.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sidecar.core import decision, phases, protocol
from sidecar.core.decision import Denial, Gateway, Request
from sidecar.core.errors import LedgerUnavailable, PaymentError, X402Error
from sidecar.core.money import Asset
from sidecar.core.phases import ResponsePhase
from sidecar.core.pricing import Price, RouteTable
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import CAPTURED, NO_HOLD, HoldClosed
from sidecar.server import metrics
from sidecar.server.envoy import contract
from sidecar.server.logs import DecisionLog, get_logger
from sidecar.server.schemes.base import HoldingScheme
from sidecar.server.schemes.exact import ExactSettler
from sidecar.server.schemes.registry import Schemes

log = get_logger("sidecar.processor")

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Continue:
    """The service's response goes on, with these headers set (overwritten) and removed."""

    set_headers: Headers = ()
    remove_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Immediate:
    """The service's response is replaced by this one."""

    status: int
    headers: Headers
    body: bytes
    details: str


Answer = Continue | Immediate
CONTINUE = Continue()


def receipt_headers(
    receipt: Mapping[str, Any], settlement: Mapping[str, Any] | None = None
) -> Headers:
    encoded = protocol.encode_header(receipt)
    return protocol.receipt_headers(encoded, settlement)


def immediate(status: int, reason: str, message: str, denial: Denial | None = None) -> Immediate:
    """Replace the service's response: a capture that cannot happen never serves it free.
    `denial`: the check's own refusal (a 402 with its fresh challenge) to answer instead."""
    if denial is not None:
        return Immediate(status, denial.headers, denial.body, f"x402_{reason}")
    body = json.dumps({"error": reason, "message": message}).encode()
    headers: Headers = (("content-type", "application/json"), ("cache-control", "no-store"))
    if status == 503:
        headers += (("retry-after", "1"),)
    return Immediate(status, headers, body, f"x402_{reason}")


@lru_cache(maxsize=1024)
def _phase(annotations: tuple[tuple[str, str], ...], asset: Asset) -> ResponsePhase | None:
    return phases.from_annotations("hold metadata", dict(annotations), asset)


class Processor:
    def __init__(
        self,
        routes: RouteTable,
        gateway: Gateway,
        ledger: Ledger,
        worker: int = 0,
        decisions: DecisionLog | None = None,
        settler: ExactSettler | None = None,
    ) -> None:
        self.assets = routes.assets
        self.gateway = gateway
        self.worker = worker
        self.decisions = decisions or DecisionLog()
        self.holding = Schemes(gateway, ledger, settler).holding

    async def response_headers(
        self, meta: Mapping[str, str] | None, headers: Mapping[str, str], deadline: float | None
    ) -> Answer:
        """The response's headers: `meta`, the check's ext_authz metadata (None: a free
        route); `deadline`, when Envoy stops waiting (time.perf_counter(); None: unknown)."""
        if meta is None:
            return CONTINUE  # a free route
        if contract.HOLD not in meta:  # charged on check, or a redelivery
            usage = meta.get(phases.EXT_USAGE_HEADER)
            if usage is None:
                return CONTINUE
            return Continue(remove_headers=(usage,))
        # Once the ledger is asked, finish: if Envoy gives up meanwhile (the client hung
        # up), the capture or release it made still gets its decision line and revenue.
        return await asyncio.shield(self._held(meta, headers, deadline))

    async def _held(
        self, meta: Mapping[str, str], headers: Mapping[str, str], deadline: float | None
    ) -> Answer:
        started = time.perf_counter()
        status = int(headers.get(":status", "0") or 0)
        line: dict[str, Any] = {
            "request_id": meta.get(contract.REQUEST_ID) or None,
            "phase": "response",
            "route": meta.get(contract.ROUTE),
            "asset": meta.get(contract.ASSET),
            "payer": meta.get(contract.PAYER),
            "receipt_id": meta.get(contract.HOLD),
            "upstream_status": status,
            "worker": self.worker,
        }
        try:
            response = await self._close(meta, headers, status, line, deadline)
        except PaymentError as error:  # the ledger: the hold stays until it expires
            line.update(decision="deny", status=error.status, reason=error.reason)
            line.update(error.logged)
            denial = self._challenge(error, meta) if error.status == 402 else None
            response = immediate(error.status, error.reason, error.message, denial)
        except Exception:  # a bug must never serve the response free nor charge twice
            log.exception("processor.error", route=meta.get(contract.ROUTE))
            line.update(decision="deny", status=503, reason="internal_error")
            response = immediate(503, "internal_error", "the payment could not be completed")
        elapsed = time.perf_counter() - started
        line["latency_ms"] = round(elapsed * 1000, 3)
        metrics.record_phase(line, int(line.get("captured_atomic", 0)), elapsed)
        line.pop("captured_atomic", None)
        self.decisions.write(line)
        return response

    async def _close(
        self,
        meta: Mapping[str, str],
        headers: Mapping[str, str],
        status: int,
        line: dict[str, Any],
        deadline: float | None,
    ) -> Answer:
        asset = self.assets[meta[contract.ASSET]]
        annotations = tuple(sorted((k, v) for k, v in meta.items() if k.startswith("x402.")))
        phase = _phase(annotations, asset)
        if phase is None:
            raise ValueError("hold metadata without a response phase")
        holder: HoldingScheme[Any] = self.holding[meta[contract.HOLD_SCHEME]]
        held = int(meta[contract.HELD])
        line["price"] = asset.to_decimal(held)
        capture = phases.captured(phase, held, status, headers.get(phase.usage_header))
        now = int(time.time())
        remove = (phase.usage_header,)
        if capture.release:
            closing = await holder.release(meta, asset, status, now)
            line.update(decision="release", status=status, reason="service_failed")
            line.update(captured="0", released=asset.to_decimal(closing.closed.held))
            _describe(line, closing.closed)
            line.update(closing.facts)
            if closing.receipt is None:
                return Continue(remove_headers=remove)
            line["balance"] = closing.balance
            receipt = receipt_headers(closing.receipt, closing.settlement)
            return Continue(receipt, remove)
        within = None if deadline is None else deadline - time.perf_counter()
        if within is not None and within <= 0:  # Envoy has answered 503: never charge
            raise LedgerUnavailable("the response phase came past Envoy's deadline")
        closing = await holder.capture(meta, asset, capture, now, within)
        closed = closing.closed
        if capture.units is not None:
            line.update(units=capture.units, usage=capture.usage)
        _describe(line, closed)
        line.update(closing.facts)
        if closed.outcome != CAPTURED or closing.receipt is None:
            return self._lost(closed, line)
        line.update(decision="capture", status=status, reason="captured")
        line.update(
            captured=asset.to_decimal(closed.amount),
            released=asset.to_decimal(closed.held - closed.amount),
            balance=closing.balance,
            captured_atomic=closed.amount,
        )
        return Continue(receipt_headers(closing.receipt, closing.settlement), remove)

    def _challenge(self, error: PaymentError, meta: Mapping[str, str]) -> Denial | None:
        """A 402 at the response (`exact`'s settlement_failed) as the check would answer
        it: the error with a fresh challenge (PAYMENT-REQUIRED), so the agent can pay again."""
        try:
            method, _, path = meta[contract.RESOURCE].partition(" ")
            asset = self.assets[meta[contract.ASSET]]
            request = Request(
                method, path, meta.get(contract.HOST, ""), meta.get(contract.HTTP_SCHEME) or "http"
            )
            annotations = tuple(sorted((k, v) for k, v in meta.items() if k.startswith("x402.")))
            phase = _phase(annotations, asset)
            price = Price(meta[contract.ROUTE], int(meta[contract.HELD]), asset, phase=phase)
        except (KeyError, ValueError, X402Error):  # without those facts: the plain refusal
            return None
        return decision.deny(error, request, price, self.gateway, int(time.time()))

    def _lost(self, closed: HoldClosed, line: dict[str, Any]) -> Immediate:
        """The hold was gone (expired and released) when the response came: nothing was
        charged, so the response is not served."""
        line.update(decision="deny", status=504, reason="hold_expired", captured="0")
        if closed.outcome == NO_HOLD:
            line["reason"] = "no_hold"
        return immediate(
            504,
            "hold_expired",
            "the service answered after the payment's hold expired; nothing was charged, "
            "retry with the same proof",
        )


def _describe(line: dict[str, Any], closed: HoldClosed) -> None:
    """The decision line's request facts, from the hold's record (PROTOCOL §7)."""
    method, _, path = closed.record.get("resource", "").partition(" ")
    line["method"], line["path"] = method or None, path or None
    line["invoice_id"] = closed.record.get("invoice_id") or None
