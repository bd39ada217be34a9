"""The check's MCP room: an MCP route's JSON-RPC body priced by its tool (core/mcp.py).

Envoy sends the body of an MCP route's requests to the check (with_request_body, bounded;
server/envoy/routes.py). `tools/call` of a priced tool pays like any priced request, the
payment read from `params._meta["x402/payment"]` (an x402 v2 `PaymentPayload`: `exact`
for the official MCP client, `prepaid-ed25519` for the SDK) and verified and charged by
the same schemes, under the tool's own resource (`POST /mcp#tool`), so a payment for one
tool never pays another. Every other method passes free; a tools/list tells the response
phase the prices to show. Refusals speak the x402 MCP convention: an HTTP 200 whose
JSON-RPC result is the `PaymentRequired` (`isError: true`), or a JSON-RPC error for a
body that is not JSON-RPC — as JSON, or as one SSE event where the client accepts only
that.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.core import decision, mcp, protocol
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import InvoiceMismatch, McpError, PaymentError, PaymentRequired
from sidecar.core.mcp import Call
from sidecar.core.mcp_results import settle_response
from sidecar.core.pricing import Price
from sidecar.server.envoy import contract

if TYPE_CHECKING:
    from sidecar.server.schemes.base import Charged


class Facts(Protocol):
    """What this room reads of a check's facts (server/authz/check.py Facts)."""

    headers: Mapping[str, str]
    body: bytes


class Answers(Protocol):
    """The transport's encoder (server/authz/check.py Answers), as far as used here."""

    free: bytes

    def ok(
        self,
        upstream: Iterable[tuple[str, str]],
        response: Iterable[tuple[str, str]],
        metadata: Mapping[str, str],
    ) -> bytes: ...


def _compact(value: Any) -> Any:
    """A payload without JSON nulls (x402.mcp's client dumps its optional fields as null,
    its HTTP client leaves them out: both are the same payment)."""
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    return value


def tool_price(price: Price, tool: str) -> Price | None:
    """The price one call of `tool` pays on this MCP route, or None if it is free."""
    assert price.mcp is not None
    amount = price.mcp.price_of(tool)
    if not amount:
        return None
    description = price.description or f"MCP tool {tool}"
    return Price(price.route, amount, price.asset, description, price.phase)


def prices_json(price: Price) -> str:
    """A tools/list's prices for the response phase (core/mcp_results.with_prices)."""
    assert price.mcp is not None
    default = price.asset.to_decimal(price.mcp.default) if price.mcp.default else None
    listing = {
        "tools": price.mcp.listing(price.asset),
        "default": default,
        "asset": price.asset.code,
    }
    return json.dumps(listing, separators=(",", ":"))


class McpCalls:
    """An MCP route's answers and facts, for one CheckService (server/authz/check.py,
    whose `_mcp` runs the check itself)."""

    def __init__(self, gateway: Gateway, answers: Answers) -> None:
        self.gateway, self.answers = gateway, answers

    def accepting(self, facts: Facts) -> Call:
        """A call not yet read: how the client takes the gateway's answers (its Accept)."""
        return Call(None, "", sse=mcp.wants_sse(facts.headers.get(contract.ACCEPT_HEADER, "")))

    def parse(self, facts: Facts, price: Price, accepting: Call) -> Call:
        """The JSON-RPC request of an MCP route's body (typed McpError otherwise)."""
        assert price.mcp is not None
        parsed = mcp.parse(facts.body, price.mcp, contract.MCP_BODY_BYTES)
        return replace(parsed, sse=accepting.sse)

    def free(self, call: Call, price: Price) -> bytes:
        """A free method's allow; a tools/list's tells the response phase the prices."""
        answers = self.answers
        if call.method != mcp.TOOLS_LIST:
            return answers.free
        meta = {contract.MCP: contract.MCP_LIST, contract.MCP_PRICES: prices_json(price)}
        return answers.ok((), (), meta)

    def tool_request(self, request: Request, call: Call, tool: str) -> Request:
        """The request a tool call pays as: its own resource, its payment as the header
        value the schemes read. A payment for another tool's URL is refused here."""
        path = mcp.tool_path(request.path, tool)
        header = None
        if call.payment is not None:
            payment = _compact(call.payment)
            resource = payment.get("resource")
            if isinstance(resource, Mapping) and "url" in resource:
                url = mcp.tool_url(request.base_url(self.gateway), request.path, tool)
                if resource["url"] != url:
                    raise InvoiceMismatch(f"the payment is for {str(resource['url'])[:200]!r}")
            header = protocol.encode_header(payment)
        return Request(
            request.method, path, request.host, request.scheme, header,
            body_digest=call.arguments_digest,
        )  # fmt: skip

    def allow_metadata(self, charged: Charged, price: Price) -> dict[str, str]:
        """A paid call's settlement, for the response phase to write into the result."""
        settled = settle_response(charged.receipt, price.asset, self.gateway.network)
        return {contract.MCP: contract.MCP_CALL, contract.MCP_SETTLE: _json(settled)}

    def refusal(
        self,
        call: Call,
        error: PaymentError,
        request: Request,
        price: Price | None,
        now: int,
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes] | None:
        """The MCP answer to a refusal, or None for the plain one (403, 409, 429, 503: the
        client's problem is not the payment's terms)."""
        sse = call.sse
        if isinstance(error, McpError):
            headers, body = mcp.encode(mcp.error_message(call.id, error), sse)
            return error.status, headers, body
        if error.status not in (400, 402) or price is None or call.tool is None:
            return None
        # the route's price (a refusal before the tool was priced), or the tool's own
        priced = price if price.mcp is None else tool_price(price, call.tool)
        if priced is None:
            return None
        path = request.path.partition("#")[0]  # the route's, or the tool call's
        tool_request = Request(
            request.method, mcp.tool_path(path, call.tool), request.host, request.scheme
        )
        challenge = error if error.status == 402 else PaymentRequired(error.message)
        gateway = self.gateway
        denial = decision.deny(challenge, tool_request, priced, gateway, now)
        required = dict(protocol.decode_header(dict(denial.headers)["payment-required"]))
        required["error"] = error.reason
        resource = dict(required.get("resource", {}))
        resource["url"] = mcp.tool_url(request.base_url(gateway), path, call.tool)
        required["resource"] = resource
        headers, body = mcp.encode(mcp.payment_required_result(call.id, required), sse)
        return 200, headers, body


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
