"""The response phase's decision, on routes charged on success, whichever transport brings it.

Envoy runs it only on routes whose config enables it (server/envoy/routes.py): a held
route's as its Lua filter's HTTP call (server/envoy/phase_call.py, http_transport.py), an
MCP route's over ext_proc's gRPC stream (grpc_transport.py). The check phase
(server/authz/) placed a hold and left its facts in ext_authz's dynamic metadata, which
Envoy forwards here. From the response's status and the usage the service reported,
core/phases.py says what to capture; the hold's scheme (server/schemes/) captures or
releases it in one ledger script, and the client's response gets the signed receipt
(PAYMENT-RESPONSE / X-Payment-Response) with the amount actually charged, and loses the
usage header. A capture that cannot happen (the hold expired, the ledger is down)
replaces the response with an error: a response is never served free. If this phase
never runs (the sidecar or Envoy died, the client went away), the hold expires and the
ledger releases it: the payer is charged only when the response was seen.

The answer is transport-free (answers.py: Continue, Immediate, or Wait: the decision
comes with the body); each transport writes it its way. Two routes wait for the body: an
MCP route's (mcp.py: the settlement goes into the tool's result) and a held route's whose
response is kept for its payment's retries (server/replays.py: the capture records it;
a body the Lua call did not read, too long or chunked, is captured, not kept).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from sidecar.core import decision, phases
from sidecar.core.decision import Denial, Gateway, Request
from sidecar.core.errors import LedgerUnavailable, PaymentError, X402Error
from sidecar.core.money import Asset
from sidecar.core.phases import ResponsePhase
from sidecar.core.pricing import Price, RouteTable
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import CAPTURED, NO_HOLD, HoldClosed
from sidecar.server import metrics, replays
from sidecar.server.envoy import contract
from sidecar.server.logs import DecisionLog, get_logger
from sidecar.server.processing.answers import (
    CONTINUE,
    WAIT,
    Answer,
    Continue,
    Immediate,
    Wait,
    immediate,
    receipt_headers,
)
from sidecar.server.processing.mcp import HELD_BACK, NOT_SERVED, TOOL_FAILED, McpResponses
from sidecar.server.schemes.base import HoldingScheme
from sidecar.server.schemes.registry import Schemes
from sidecar.server.settler import ExactSettler

log = get_logger("sidecar.processor")


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
        # MCP routes: the settlement in the tool's result (mcp.py).
        self.mcp = McpResponses(self.assets, gateway.network, self._held)
        # Responses kept for their payments' retries (server/replays.py): the capture
        # waits for the body Envoy buffers on held routes.
        self.keeping = gateway.replay_per_payer > 0

    async def response_headers(
        self,
        meta: Mapping[str, str] | None,
        headers: Mapping[str, str],
        deadline: float | None,
        end_of_stream: bool = False,
        body_follows: bool = False,
    ) -> Answer | Wait:
        """The response's headers: `meta`, the check's ext_authz metadata (None: a free
        route); `deadline`, when Envoy stops waiting (time.perf_counter(); None: unknown);
        `end_of_stream`: the response has no body; `body_follows`: the transport brings
        its body next (then Wait: the decision comes with response_body)."""
        if meta is None:
            return CONTINUE  # a free route
        if contract.MCP in meta:
            if end_of_stream:  # no body: no JSON-RPC answer at all
                return await self.mcp.body(meta, headers, b"", deadline)
            if body_follows:
                return Wait(HELD_BACK)
            if contract.HOLD not in meta:  # paid at the check: served, without its _meta
                return CONTINUE
            # The tool's answer never comes, so its hold cannot be closed by it: never
            # served free (the hold expires, nothing charged).
            return immediate(503, "internal_error", "the payment could not be completed")
        if contract.HOLD not in meta:  # charged on check, or a redelivery
            usage = meta.get(phases.EXT_USAGE_HEADER)
            if usage is None:
                return CONTINUE
            return Continue(remove_headers=(usage,))
        if self.keeping and body_follows and not end_of_stream:
            return WAIT  # the capture records the body: it waits for it
        # Once the ledger is asked, finish: if Envoy gives up meanwhile (the client hung
        # up), the capture or release it made still gets its decision line and revenue.
        body = b"" if end_of_stream else None  # None: not seen
        return await asyncio.shield(self._held(meta, headers, deadline, body=body))

    async def response_body(
        self,
        meta: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes | None,
        deadline: float | None,
    ) -> Answer:
        """The body after a Wait (whole, or None: larger than Envoy's buffer), with the
        headers and metadata the transport kept: an MCP tool's answer gets its settlement,
        a held response is captured and kept with it."""
        if contract.MCP in meta:
            return await self.mcp.body(meta, headers, body or b"", deadline)
        return await asyncio.shield(self._held(meta, headers, deadline, body=body))

    async def unanswered(self, meta: Mapping[str, str], headers: Mapping[str, str]) -> None:
        """The body a decision waited for never came: Envoy failed the response (an MCP
        answer longer than contract.MCP_BUFFER_BYTES) or the client went away. Nothing was
        served, so a hold goes back now rather than at its expiry."""
        if contract.HOLD in meta:
            await asyncio.shield(self._held(meta, headers, None, NOT_SERVED))

    async def _held(
        self,
        meta: Mapping[str, str],
        headers: Mapping[str, str],
        deadline: float | None,
        failure: str = "",
        body: bytes | None = None,
    ) -> Answer:
        """Close the hold; `failure` (TOOL_FAILED: an MCP tool's answer was an error,
        whatever its status, mcp.py; NOT_SERVED: the answer never came) releases it;
        `body`: the response's, to keep."""
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
        if failure == TOOL_FAILED:
            line["tool_failed"] = True
        kept = ""
        if self.keeping and not failure:
            limit = self.gateway.replay_body_max_bytes
            kept = replays.encode(status, headers.items(), body, limit)
        try:
            closing_status = max(status, 599) if failure else status
            response = await self._close(meta, headers, closing_status, line, deadline, kept)
            if failure and line.get("decision") == "release":
                line.update(status=status, reason=failure)
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
        kept: str = "",
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
        capture = dataclasses.replace(capture, response=kept)
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
