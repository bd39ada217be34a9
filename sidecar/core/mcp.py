"""MCP tool calls priced at the edge: a route's tool prices, the JSON-RPC 2.0 request the
check reads, and the messages of the x402 MCP convention (PyPI `x402.mcp`). Pure.

An MCP route (`mcp: {tools: {name: price}, default: free|price}`) is an MCP server's
streamable-HTTP endpoint. Its POST bodies are JSON-RPC 2.0: `tools/call` of a priced tool
pays, with the x402 `PaymentPayload` in `params._meta["x402/payment"]`; every other
method passes free. An unpaid priced call is answered with a JSON-RPC *result*
(`isError: true`, `structuredContent` = the x402 `PaymentRequired`, the same JSON as text
content); the settlement comes back in `result._meta["x402/payment-response"]`
(core/mcp_results.py writes it into the service's answer).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import (
    AmountError,
    ConfigError,
    McpBatchRefused,
    McpBodyTooLarge,
    McpError,
    McpInvalidParams,
    McpParseError,
)
from sidecar.core.money import MAX_BALANCE, Asset

PAYMENT_META = "x402/payment"  # x402.mcp MCP_PAYMENT_META_KEY
PAYMENT_RESPONSE_META = "x402/payment-response"  # x402.mcp MCP_PAYMENT_RESPONSE_META_KEY
PRICE_META = "x402/price"  # a priced tool's price in a tools/list result (ours)
TOOLS_CALL, TOOLS_LIST = "tools/call", "tools/list"
FREE = "free"
ROUTE_KEY = "mcp"  # the route key of the sidecar config
# The request body the check reads at most (Envoy's with_request_body.max_request_bytes):
# a longer one is refused 413 by Envoy itself, never forwarded.
DEFAULT_MAX_BODY_BYTES = 65536
# Envoy's per-route annotations (ext_authz context_extensions) of an MCP route.
EXT_MCP_TOOLS, EXT_MCP_DEFAULT = "x402.mcp_tools", "x402.mcp_default"
MCP_KEYS = (EXT_MCP_TOOLS, EXT_MCP_DEFAULT)
MAX_TOOL_CHARS = 128  # MCP tool names are short identifiers
MAX_BRACKETS = 512  # nesting bound before the recursive JSON parser (core/protocol.py)
JSONRPC = "2.0"


@dataclass(frozen=True, slots=True)
class ToolPrices:
    """An MCP route's prices: each listed tool's, in atomic units, and the others'."""

    tools: tuple[tuple[str, int], ...]
    default: int = 0  # 0: tools not listed are free

    def price_of(self, tool: str) -> int:
        for name, amount in self.tools:
            if name == tool:
                return amount
        return self.default

    @property
    def maximum(self) -> int:
        """The most one call costs: the route's price where one number is shown."""
        return max((amount for _, amount in self.tools), default=self.default) or self.default

    def listing(self, asset: Asset) -> dict[str, str]:
        """Each priced tool's price as a wire decimal (discovery, tools/list)."""
        return {name: asset.to_decimal(amount) for name, amount in self.tools if amount}


def _amount(key: str, value: Any, asset: Asset) -> int:
    if value == FREE:
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f'{key}: write the price as a string, like "0.01", or "free"')
    try:
        amount = asset.to_atomic(value)
    except AmountError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if amount > MAX_BALANCE:
        raise ConfigError(f"{key}: larger than the ledger's maximum balance")
    return amount


def _tool_name(key: str, name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_TOOL_CHARS:
        raise ConfigError(f"{key}: a tool name is a string of 1..{MAX_TOOL_CHARS} characters")
    if any(c in name for c in ",= \t\r\n"):
        raise ConfigError(f"{key}: the tool name {name!r} has a comma, '=' or a space")
    return name


def tool_prices(key: str, spec: Any, asset: Asset) -> ToolPrices:
    """A route's `mcp` mapping (docs/configuration.md), checked; ConfigError otherwise."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: must be a mapping with tools (name: price) and default")
    unknown = set(spec) - {"tools", "default"}
    if unknown:
        raise ConfigError(f"{key}: unknown key {sorted(unknown)[0]!r}")
    tools = spec.get("tools", {})
    if not isinstance(tools, Mapping):
        raise ConfigError(f"{key}.tools: must map each priced tool's name to its price")
    priced = tuple(  # by name: the config's and the annotations' prices compare equal
        sorted(
            (_tool_name(f"{key}.tools", name), _amount(f"{key}.tools.{name}", price, asset))
            for name, price in tools.items()
        )
    )
    default = _amount(f"{key}.default", spec.get("default", FREE), asset)
    prices = ToolPrices(priced, default)
    if not prices.maximum:
        raise ConfigError(f"{key}: prices no tool; list a priced tool or a default price")
    return prices


def route_prices(
    key: str, spec: Mapping[str, Any], method: str, asset: Asset, phase: Any
) -> ToolPrices | None:
    """A config route's tool prices, if it is an MCP route: POST only (an MCP server's GET
    stream is never buffered), priced by its tools, not metered."""
    if ROUTE_KEY not in spec:
        return None
    if method != "POST":
        raise ConfigError(f"{key}.method: an MCP route is POST (its tool calls), not {method}")
    if "price" in spec:
        raise ConfigError(f"{key}.price: an MCP route is priced by its tools (mcp.tools)")
    if getattr(phase, "metered", False):
        raise ConfigError(f"{key}: an MCP route is priced per tool call, not metered")
    return tool_prices(f"{key}.{ROUTE_KEY}", spec[ROUTE_KEY], asset)


def spec_annotations(spec: Mapping[str, Any]) -> dict[str, str]:
    """The renderer's annotations of a config route's `mcp` mapping (as written; the
    sidecar checks them with `from_annotations`)."""
    if not isinstance(spec.get(ROUTE_KEY), Mapping):
        return {}
    tools = spec[ROUTE_KEY].get("tools") or {}
    listed = ",".join(f"{name}={price}" for name, price in sorted(tools.items()))
    return {EXT_MCP_TOOLS: listed, EXT_MCP_DEFAULT: str(spec[ROUTE_KEY].get("default", FREE))}


def from_annotations(tools: str, default: str, asset: Asset) -> ToolPrices:
    """The prices of Envoy's `x402.mcp_tools` ("name=0.01,other=0.25") and
    `x402.mcp_default` ("free" or a price) annotations."""
    spec: dict[str, Any] = {"tools": {}, "default": default or FREE}
    for entry in filter(None, tools.split(",")):
        name, sep, price = entry.partition("=")
        if not sep:
            raise ConfigError(f"context_extensions {EXT_MCP_TOOLS}: {entry!r} is not name=price")
        spec["tools"][name.strip()] = price.strip()
    return tool_prices("context_extensions x402.mcp", spec, asset)


@dataclass(frozen=True, slots=True)
class Call:
    """One JSON-RPC request of an MCP route, as far as pricing goes."""

    id: str | int | None
    method: str
    tool: str | None = None  # tools/call's params.name
    payment: Mapping[str, Any] | None = None  # params._meta["x402/payment"]
    sse: bool = False  # the gateway's own answer as an SSE event (the client's Accept)
    # SHA-256 of the call's `arguments` (canonical JSON): part of what its payment covers,
    # so a retry with other arguments is another request (docs/protocol.md §13)
    arguments_digest: str = ""


def _load(body: bytes, max_bytes: int) -> Any:
    if len(body) > max_bytes:
        raise McpBodyTooLarge(f"the JSON-RPC body is larger than {max_bytes} bytes")
    if body.count(b"[") + body.count(b"{") > MAX_BRACKETS:
        raise McpParseError("the JSON-RPC body is nested too deeply")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise McpParseError("the body is not JSON") from None


def _id(message: Mapping[str, Any]) -> str | int | None:
    value = message.get("id")
    if value is None or isinstance(value, str) or (type(value) is int):
        return value
    raise McpError("a JSON-RPC id is a string or an integer")


def _call(message: Any) -> Call:
    if not isinstance(message, dict) or message.get("jsonrpc") != JSONRPC:
        raise McpError("the body is not a JSON-RPC 2.0 message")
    request_id = _id(message)
    method = message.get("method")
    if method is None and ("result" in message or "error" in message):
        return Call(request_id, "")  # the client's answer to a server request: free
    if not isinstance(method, str):
        raise McpError("a JSON-RPC request names its method as a string")
    if method != TOOLS_CALL:
        return Call(request_id, method)
    params = message.get("params")
    if not isinstance(params, dict):
        raise McpInvalidParams("tools/call needs params with the tool's name")
    name = params.get("name")
    if not isinstance(name, str):
        raise McpInvalidParams("tools/call: params.name must be a string")
    meta = params.get("_meta", {})
    if not isinstance(meta, dict):
        raise McpInvalidParams("tools/call: params._meta must be an object")
    payment = meta.get(PAYMENT_META)
    if payment is not None and not isinstance(payment, dict):
        raise McpInvalidParams(f"tools/call: params._meta[{PAYMENT_META!r}] must be an object")
    arguments = params.get("arguments", {})
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return Call(request_id, method, name, payment, arguments_digest=digest)


def parse(body: bytes, prices: ToolPrices, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Call:
    """The request an MCP route's body holds; a batch only if it prices nothing (its first
    message then stands for it: it passes free). Typed McpError otherwise."""
    message = _load(body, max_bytes)
    if not isinstance(message, list):
        return _call(message)
    if not message:
        raise McpError("an empty JSON-RPC batch")
    calls = [_call(item) for item in message]
    for call in calls:
        if call.tool is not None and prices.price_of(call.tool):
            raise McpBatchRefused(
                f"the batch holds a priced tools/call ({call.tool[:MAX_TOOL_CHARS]}): send "
                "each priced call alone"
            )
    return Call(None, "batch")


def error_message(request_id: str | int | None, error: McpError) -> dict[str, Any]:
    """The JSON-RPC error the gateway answers for a body it cannot price."""
    return {
        "jsonrpc": JSONRPC,
        "id": request_id,
        "error": {"code": error.code, "message": error.message, "data": {"reason": error.reason}},
    }


def payment_required_result(
    request_id: str | int | None, required: Mapping[str, Any]
) -> dict[str, Any]:
    """x402.mcp's payment-required answer: a result whose `isError` is true, with the
    `PaymentRequired` as structuredContent and as text."""
    return {
        "jsonrpc": JSONRPC,
        "id": request_id,
        "result": {
            "content": [{"type": "text", "text": json.dumps(required, separators=(",", ":"))}],
            "structuredContent": dict(required),
            "isError": True,
        },
    }


def wants_sse(accept: str) -> bool:
    """Whether a client's Accept takes only an SSE stream (JSON when both are offered)."""
    lowered = accept.lower()
    return "text/event-stream" in lowered and "application/json" not in lowered


def encode(message: Mapping[str, Any], sse: bool) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """An answer's headers and body: one JSON document, or one SSE `message` event."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if sse:
        headers = (("content-type", "text/event-stream"), ("cache-control", "no-store"))
        return headers, b"event: message\ndata: " + data + b"\n\n"
    return (("content-type", "application/json"), ("cache-control", "no-store")), data


def tool_url(base_url: str, path: str, tool: str) -> str:
    """The resource a tool call pays for: the route's URL, the tool as its fragment."""
    return f"{base_url}{tool_path(path, tool)}"


def tool_path(path: str, tool: str) -> str:
    """The path a tool call's proofs name (`resource`: "POST /mcp#get_weather"): a fragment
    never reaches a server, so no HTTP route has it."""
    return f"{path}#{tool}"
