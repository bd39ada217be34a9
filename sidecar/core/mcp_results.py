"""What the response phase does to an MCP server's answer (core/mcp.py prices the request):
whether the tool failed, the settlement written into `result._meta`, each priced tool's
price written into a tools/list result. The answer is one JSON document or an SSE stream
of `data:` events (streamable HTTP); either way only JSON-RPC responses change. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.core import mcp
from sidecar.core.money import Asset

Edit = Callable[[dict[str, Any]], bool]  # changes a response in place; whether it did


def _is_response(message: Any) -> bool:
    return isinstance(message, dict) and ("result" in message or "error" in message)


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _dumps(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _sse(content_type: str) -> bool:
    return content_type.lower().startswith("text/event-stream")


def responses(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """The JSON-RPC responses of an answer, in order."""
    if not _sse(content_type):
        message = _loads(body)
        items = message if isinstance(message, list) else [message]
        return [item for item in items if _is_response(item)]
    found = []
    for line in body.splitlines():
        if line.startswith(b"data:"):
            message = _loads(line[5:].strip())
            if _is_response(message):
                found.append(message)
    return found


def rewrite(body: bytes, content_type: str, edit: Edit) -> bytes | None:
    """The answer with `edit` applied to each JSON-RPC response, or None if nothing changed
    (an SSE event's other lines and line endings stay as they were)."""
    if not _sse(content_type):
        message = _loads(body)
        items = message if isinstance(message, list) else [message]
        changed = [edit(item) for item in items if _is_response(item)]
        return _dumps(message) if any(changed) else None
    lines = body.splitlines(keepends=True)
    changed_any = False
    for index, line in enumerate(lines):
        if not line.startswith(b"data:"):
            continue
        message = _loads(line[5:].strip())
        if _is_response(message) and edit(message):
            ending = line[len(line.rstrip(b"\r\n")) :]
            lines[index] = b"data: " + _dumps(message) + ending
            changed_any = True
    return b"".join(lines) if changed_any else None


def failed(body: bytes, content_type: str) -> bool:
    """Whether the tool's answer is a failure: a JSON-RPC error, `isError: true`, or no
    JSON-RPC response at all (an `on_success` route then charges nothing)."""
    found = responses(body, content_type)
    if not found:
        return True
    for message in found:
        if "error" in message:
            return True
        result = message.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            return True
    return False


def settle_response(
    receipt: Mapping[str, Any], asset: Asset, network: str, reason: str = ""
) -> dict[str, Any]:
    """The x402 `SettleResponse` of a tool call (x402.schemas.SettleResponse, camelCase):
    `exact`'s transaction and network, or for a prepaid payment the receipt id on the
    gateway's ledger network; `amount` in atomic units; the gateway's signed receipt
    under `extra.receipt`."""
    success = bool(receipt.get("success", True)) and not reason
    transaction = receipt.get("transaction") or receipt.get("receipt_id", "")
    if not success:
        transaction = receipt.get("transaction", "")
    settled: dict[str, Any] = {
        "success": success,
        "payer": receipt.get("payer"),
        "transaction": transaction,
        "network": receipt.get("network") or network,
        "amount": str(asset.to_atomic(str(receipt.get("amount", "0")))),
        "extra": {"receipt": dict(receipt)},
    }
    if not success:
        settled["errorReason"] = reason or "not_settled"
    return settled


def with_payment_response(settled: Mapping[str, Any]) -> Edit:
    """Writes the settlement into each result's `_meta["x402/payment-response"]`."""

    def edit(message: dict[str, Any]) -> bool:
        result = message.get("result")
        if not isinstance(result, dict):
            return False
        meta = result.get("_meta")
        kept = meta if isinstance(meta, dict) else {}
        result["_meta"] = {**kept, mcp.PAYMENT_RESPONSE_META: dict(settled)}
        return True

    return edit


def with_prices(prices: Mapping[str, str], default: str | None, asset: str) -> Edit:
    """Writes each priced tool's price (`default`: the others') into its
    `_meta["x402/price"]` in a tools/list result."""

    def edit(message: dict[str, Any]) -> bool:
        result = message.get("result")
        tools = result.get("tools") if isinstance(result, dict) else None
        if not isinstance(tools, list):
            return False
        changed = False
        for tool in tools:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            amount = prices.get(tool["name"], default)
            if amount is None:
                continue
            meta = tool.get("_meta")
            price = {"amount": amount, "asset": asset}
            tool["_meta"] = {**(meta if isinstance(meta, dict) else {}), mcp.PRICE_META: price}
            changed = True
        return changed

    return edit
