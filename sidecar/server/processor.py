"""The response phase: Envoy's ext_proc v3 servicer, on routes charged on success.

Envoy's ext_proc filter runs only on routes whose config enables it (server/envoy/routes.py),
with request headers skipped and response headers sent. The check phase (server/authz/) placed a
hold and left its facts in ext_authz's dynamic metadata, which the filter forwards here
(`metadata_options.forwarding_namespaces`). From the response's status and the usage the
service reported, core/phases.py says what to capture; the hold's scheme (server/schemes/)
captures or releases it in one ledger script, and the client's response gets the signed
receipt (PAYMENT-RESPONSE / X-Payment-Response) with the amount actually charged, and
loses the usage header. A capture that cannot happen (the hold expired, the ledger is
down) replaces the response with an error: a response is never served free. If this phase
never runs (the sidecar or Envoy died, the client went away), the hold expires and the
ledger releases it: the payer is charged only when the response was seen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping
from functools import lru_cache
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.type.v3.http_status_pb2 import HttpStatus

from sidecar.core import decision, phases, protocol
from sidecar.core.decision import Denial, Gateway, Request
from sidecar.core.errors import PaymentError, X402Error
from sidecar.core.money import Asset
from sidecar.core.phases import ResponsePhase
from sidecar.core.pricing import Price, RouteTable
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import CAPTURED, NO_HOLD, HoldClosed
from sidecar.server import metrics, replays
from sidecar.server.envoy import contract
from sidecar.server.envoy.contract import EXT_AUTHZ
from sidecar.server.logs import DecisionLog, get_logger
from sidecar.server.mcp_response import McpResponses, McpStream
from sidecar.server.schemes.base import HoldingScheme
from sidecar.server.schemes.registry import Schemes
from sidecar.server.settler import ExactSettler

PROCESSOR_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_CONTINUE_HEADERS = ext_proc.ProcessingResponse(response_headers=ext_proc.HeadersResponse())

log = get_logger("sidecar.processor")


def header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()),
        append_action=HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def receipt_headers(
    receipt: Mapping[str, Any], settlement: Mapping[str, Any] | None = None
) -> list[HeaderValueOption]:
    encoded = protocol.encode_header(receipt)
    return [header(name, value) for name, value in protocol.receipt_headers(encoded, settlement)]


def headers_of(message: ext_proc.HttpHeaders) -> dict[str, str]:
    """Envoy sends header values as raw bytes (or, with an old runtime flag, as `value`)."""
    return {h.key.lower(): _value(h) for h in message.headers.headers}


def _value(header: HeaderValue) -> str:
    return header.raw_value.decode("utf-8", "replace") if header.raw_value else str(header.value)


def immediate(
    status: int, reason: str, message: str, denial: Denial | None = None
) -> ext_proc.ProcessingResponse:
    """Replace the service's response: a capture that cannot happen never serves it free.
    `denial`: the check's own refusal (a 402 with its fresh challenge) to answer instead."""
    if denial is not None:
        body = denial.body
        headers = [header(name, value) for name, value in denial.headers]
    else:
        body = json.dumps({"error": reason, "message": message}).encode()
        headers = [header("content-type", "application/json"), header("cache-control", "no-store")]
        if status == 503:
            headers.append(header("retry-after", "1"))
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=HttpStatus(code=status),
            headers=ext_proc.HeaderMutation(set_headers=headers),
            body=body,
            details=f"x402_{reason}",
        )
    )


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
        # MCP routes: the settlement in the tool's result (server/mcp_response.py)
        self.mcp = McpResponses(self.assets, gateway.network, self._held, headers_of)
        # Responses kept for their payments' retries (server/replays.py): the capture
        # waits for the body Envoy buffers on held routes.
        self.keeping = gateway.replay_per_payer > 0

    def handler(self) -> grpc.GenericRpcHandler:
        process = grpc.stream_stream_rpc_method_handler(
            self.process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=ext_proc.ProcessingResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(PROCESSOR_SERVICE, {"Process": process})

    async def process(
        self, _requests: AsyncIterator[ext_proc.ProcessingRequest], context: Any
    ) -> None:
        """One stream per response: read and answer each message (context.read/write is
        cheaper in grpc.aio than an async-generator handler)."""
        stream = McpStream()
        waiting = replays.Waiting()
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            await context.write(await self.respond(request, context, stream, waiting))

    async def respond(
        self,
        request: ext_proc.ProcessingRequest,
        context: Any = None,
        stream: McpStream | None = None,
        waiting: replays.Waiting | None = None,
    ) -> ext_proc.ProcessingResponse:
        """One message of the stream; anything but response headers continues unchanged,
        but the body of an MCP call (server/mcp_response.py) or of a held response whose
        capture waits for it (`waiting`)."""
        kind = request.WhichOneof("request")
        if kind == "response_headers":
            return await self.response_headers(request, context, stream, waiting)
        if kind == "response_body" and stream is not None and stream.headers is not None:
            return await self.mcp.body(request, stream, context)
        if kind == "response_body" and waiting is not None and waiting.headers is not None:
            return await self._held_body(request, context, waiting)
        if kind in ("request_trailers", "response_trailers"):
            return ext_proc.ProcessingResponse(**{kind: ext_proc.TrailersResponse()})
        if kind in ("request_body", "response_body"):
            return ext_proc.ProcessingResponse(**{kind: ext_proc.BodyResponse()})
        return ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())

    async def response_headers(
        self,
        request: ext_proc.ProcessingRequest,
        context: Any,
        stream: McpStream | None = None,
        waiting: replays.Waiting | None = None,
    ) -> ext_proc.ProcessingResponse:
        namespace = request.metadata_context.filter_metadata.get(EXT_AUTHZ)
        if namespace is not None and contract.MCP in namespace.fields and stream is not None:
            return await self.mcp.headers(request, namespace, stream, context)
        if namespace is None:
            return _CONTINUE_HEADERS  # a free route
        if contract.HOLD not in namespace.fields:  # charged on check, or a redelivery
            usage = namespace.fields.get(phases.EXT_USAGE_HEADER)
            if usage is None:
                return _CONTINUE_HEADERS
            return _headers(ext_proc.HeaderMutation(remove_headers=[usage.string_value]))
        if self.keeping and waiting is not None and not request.response_headers.end_of_stream:
            waiting.headers = request  # the capture records the body: it waits for it
            return _CONTINUE_HEADERS
        # Once the ledger is asked, finish: if Envoy gives up meanwhile (the client hung
        # up), the capture or release it made still gets its decision line and revenue.
        body = b"" if request.response_headers.end_of_stream else None  # None: not seen
        return await asyncio.shield(self._held(request, namespace, context, body=body))

    async def _held_body(
        self, request: ext_proc.ProcessingRequest, context: Any, waiting: replays.Waiting
    ) -> ext_proc.ProcessingResponse:
        """The body of a held response (whole, or Envoy's buffer of it): capture now, the
        response kept with it; the receipt headers go out with this answer."""
        first, waiting.headers = waiting.headers, None
        namespace = first.metadata_context.filter_metadata[EXT_AUTHZ]
        part = request.response_body
        body = part.body if part.end_of_stream else None  # None: too large to keep
        answer = await asyncio.shield(self._held(first, namespace, context, body=body))
        return replays.at_body(answer)

    async def _held(
        self,
        request: ext_proc.ProcessingRequest,
        namespace: Any,
        context: Any,
        tool_failed: bool = False,
        body: bytes | None = None,
    ) -> ext_proc.ProcessingResponse:
        """Close the hold; `tool_failed`: an MCP tool's answer was an error, whatever its
        status (server/mcp_response.py), so the hold is released."""
        started = time.perf_counter()
        meta = {key: value.string_value for key, value in namespace.fields.items()}
        headers = headers_of(request.response_headers)
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
        if tool_failed:
            line["tool_failed"] = True
        kept = ""
        if self.keeping and not tool_failed:
            fields = ((h.key.lower(), _value(h)) for h in request.response_headers.headers.headers)
            kept = replays.encode(status, fields, body, self.gateway.replay_body_max_bytes)
        try:
            closing_status = max(status, 599) if tool_failed else status
            response = await self._close(meta, headers, closing_status, line, context, kept)
            if tool_failed and line.get("decision") == "release":
                line.update(status=status, reason="tool_failed")
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
        context: Any,
        kept: str = "",
    ) -> ext_proc.ProcessingResponse:
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
        mutation = ext_proc.HeaderMutation(remove_headers=[phase.usage_header])
        if capture.release:
            closing = await holder.release(meta, asset, status, now)
            line.update(decision="release", status=status, reason="service_failed")
            line.update(captured="0", released=asset.to_decimal(closing.closed.held))
            _describe(line, closing.closed)
            line.update(closing.facts)
            if closing.receipt is not None:
                line["balance"] = closing.balance
                mutation.set_headers.extend(receipt_headers(closing.receipt, closing.settlement))
            return _headers(mutation)
        within = None if context is None else context.time_remaining()
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
        mutation.set_headers.extend(receipt_headers(closing.receipt, closing.settlement))
        return _headers(mutation)

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

    def _lost(self, closed: HoldClosed, line: dict[str, Any]) -> ext_proc.ProcessingResponse:
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


def _headers(mutation: ext_proc.HeaderMutation) -> ext_proc.ProcessingResponse:
    return ext_proc.ProcessingResponse(
        response_headers=ext_proc.HeadersResponse(
            response=ext_proc.CommonResponse(header_mutation=mutation)
        )
    )
