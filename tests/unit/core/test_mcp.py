"""core/mcp.py and core/mcp_results.py: an MCP route's prices, the JSON-RPC request the
check reads, and what the response phase writes into the answer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.core import mcp, mcp_results
from sidecar.core.errors import (
    ConfigError,
    McpBatchRefused,
    McpBodyTooLarge,
    McpError,
    McpInvalidParams,
    McpParseError,
)
from sidecar.core.money import Asset

USDF = Asset("USDF", 6)
PRICES = mcp.tool_prices("t", {"tools": {"get_weather": "0.01", "big": "2"}}, USDF)


def body(message: Any) -> bytes:
    return json.dumps(message).encode()


def call(name: Any, meta: Any = None, request_id: Any = 7) -> bytes:
    params: dict[str, Any] = {"name": name, "arguments": {}}
    if meta is not None:
        params["_meta"] = meta
    return body({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params})


def test_tool_prices_price_listed_tools_and_the_default() -> None:
    assert PRICES.price_of("get_weather") == 10_000 and PRICES.price_of("other") == 0
    assert PRICES.maximum == 2_000_000
    paid = mcp.tool_prices("t", {"tools": {}, "default": "0.5"}, USDF)
    assert paid.price_of("anything") == 500_000 and paid.maximum == 500_000
    assert PRICES.listing(USDF) == {"get_weather": "0.01", "big": "2"}


@pytest.mark.parametrize(
    "spec",
    [
        "0.01",
        {"tools": {"a": 0.01}},  # a float
        {"tools": {"a": "0.0000001"}},  # too many decimals
        {"tools": {"a,b": "1"}},
        {"tools": {"": "1"}},
        {"tools": {"a": "1"}, "unknown": 1},
        {"tools": {"a": "free"}},  # prices nothing
        {"tools": ["a"]},
    ],
)
def test_bad_tool_prices_are_config_errors(spec: Any) -> None:
    with pytest.raises(ConfigError):
        mcp.tool_prices("routes.tools.mcp", spec, USDF)


def test_an_mcp_route_is_post_priced_by_its_tools() -> None:
    spec = {"path": "/mcp", "mcp": {"tools": {"a": "1"}}}
    assert mcp.route_prices("k", spec, "POST", USDF, None) is not None
    assert mcp.route_prices("k", {"path": "/x"}, "POST", USDF, None) is None
    with pytest.raises(ConfigError, match="POST"):
        mcp.route_prices("k", spec, "*", USDF, None)
    with pytest.raises(ConfigError, match="price"):
        mcp.route_prices("k", {**spec, "price": "1"}, "POST", USDF, None)


def test_the_annotations_say_the_same_prices() -> None:
    spec = {"mcp": {"tools": {"z": "0.25", "a": "0.01"}, "default": "0.001"}}
    annotations = mcp.spec_annotations(spec)
    assert annotations[mcp.EXT_MCP_TOOLS] == "a=0.01,z=0.25"  # sorted, as Helm ranges
    parsed = mcp.from_annotations(
        annotations[mcp.EXT_MCP_TOOLS], annotations[mcp.EXT_MCP_DEFAULT], USDF
    )
    assert parsed == mcp.tool_prices("x", spec["mcp"], USDF)
    with pytest.raises(ConfigError):
        mcp.from_annotations("a", "free", USDF)


def test_a_tools_call_names_its_tool_and_payment() -> None:
    parsed = mcp.parse(call("get_weather", {"x402/payment": {"x402Version": 2}}), PRICES)
    assert (parsed.id, parsed.method, parsed.tool) == (7, "tools/call", "get_weather")
    assert parsed.payment == {"x402Version": 2}
    listed = mcp.parse(body({"jsonrpc": "2.0", "id": "a", "method": "tools/list"}), PRICES)
    assert (listed.method, listed.tool) == ("tools/list", None)
    note = mcp.parse(body({"jsonrpc": "2.0", "method": "notifications/initialized"}), PRICES)
    assert note.id is None and note.tool is None
    answer = mcp.parse(body({"jsonrpc": "2.0", "id": 1, "result": {}}), PRICES)
    assert answer.method == "" and answer.tool is None  # the client answering the server


@pytest.mark.parametrize(
    ("raw", "error", "code"),
    [
        (b"{nope", McpParseError, -32700),
        (b"\xff\xfe", McpParseError, -32700),
        (b"[" * 600, McpParseError, -32700),
        (b'"text"', McpError, -32600),
        (b"[]", McpError, -32600),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "x"}', McpError, -32600),
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "x"}', McpError, -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": ["x"]}', McpError, -32600),
        (call(42), McpInvalidParams, -32602),
        (call("a", meta=[1]), McpInvalidParams, -32602),
        (call("a", meta={"x402/payment": "text"}), McpInvalidParams, -32602),
        (body({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}), McpInvalidParams, -32602),
        (b"[" + call("get_weather") + b"]", McpBatchRefused, -32600),
        (b" " * 70_000, McpBodyTooLarge, -32600),
    ],
)
def test_bad_bodies_get_their_json_rpc_error(raw: bytes, error: type[McpError], code: int) -> None:
    with pytest.raises(error) as caught:
        mcp.parse(raw, PRICES)
    assert caught.value.code == code
    message = mcp.error_message(None, caught.value)
    assert message["error"]["code"] == code
    assert message["error"]["data"]["reason"] == caught.value.reason


def test_a_batch_of_free_calls_passes() -> None:
    batch = b"[" + call("echo") + b"," + body({"jsonrpc": "2.0", "method": "ping"}) + b"]"
    assert mcp.parse(batch, PRICES).method == "batch"


def test_the_payment_required_answer_is_x402_mcps() -> None:
    required = {"x402Version": 2, "error": "payment_required", "accepts": [{"scheme": "exact"}]}
    message = mcp.payment_required_result(3, required)
    assert message["id"] == 3 and message["result"]["isError"] is True
    assert message["result"]["structuredContent"] == required
    assert json.loads(message["result"]["content"][0]["text"]) == required
    headers, raw = mcp.encode(message, sse=False)
    assert dict(headers)["content-type"] == "application/json" and json.loads(raw) == message
    headers, raw = mcp.encode(message, sse=True)
    assert dict(headers)["content-type"] == "text/event-stream"
    assert raw.startswith(b"event: message\ndata: ") and raw.endswith(b"\n\n")
    assert mcp.wants_sse("text/event-stream") and not mcp.wants_sse(
        "application/json, text/event-stream"
    )


RESULT = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}}
FAILED = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": True}}
ERROR = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "boom"}}


def sse(*messages: Any) -> bytes:
    return b"".join(b"event: message\r\ndata: " + body(m) + b"\r\n\r\n" for m in messages)


def test_a_failed_tool_is_an_error_or_is_error() -> None:
    assert not mcp_results.failed(body(RESULT), "application/json")
    assert mcp_results.failed(body(FAILED), "application/json")
    assert mcp_results.failed(body(ERROR), "application/json")
    assert mcp_results.failed(b"not json", "application/json")  # no answer: not a success
    note = {"jsonrpc": "2.0", "method": "notifications/progress"}
    assert not mcp_results.failed(sse(note, RESULT), "text/event-stream")
    assert mcp_results.failed(sse(note, ERROR), "text/event-stream")


def test_the_settlement_goes_into_the_result_in_json_and_sse() -> None:
    settled = {"success": True, "transaction": "0xabc"}
    edit = mcp_results.with_payment_response(settled)
    rewritten = mcp_results.rewrite(body(RESULT), "application/json", edit)
    assert rewritten is not None
    assert json.loads(rewritten)["result"]["_meta"][mcp.PAYMENT_RESPONSE_META] == settled
    streamed = mcp_results.rewrite(sse(RESULT), "text/event-stream", edit)
    assert streamed is not None and streamed.endswith(b"\r\n\r\n")
    [message] = mcp_results.responses(streamed, "text/event-stream")
    assert message["result"]["_meta"][mcp.PAYMENT_RESPONSE_META] == settled
    assert mcp_results.rewrite(body(ERROR), "application/json", edit) is None


def test_tools_list_gets_the_prices() -> None:
    listing = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "a"}, {"name": "b"}]}}
    edit = mcp_results.with_prices({"a": "0.01"}, None, "USDF")
    rewritten = mcp_results.rewrite(body(listing), "application/json", edit)
    assert rewritten is not None
    tools = json.loads(rewritten)["result"]["tools"]
    assert tools[0]["_meta"] == {mcp.PRICE_META: {"amount": "0.01", "asset": "USDF"}}
    assert "_meta" not in tools[1]
    by_default = mcp_results.with_prices({}, "0.5", "USDF")
    again = mcp_results.rewrite(body(listing), "application/json", by_default)
    assert again is not None
    assert all(
        t["_meta"][mcp.PRICE_META]["amount"] == "0.5" for t in json.loads(again)["result"]["tools"]
    )


def test_the_settle_response_is_the_standard_shape() -> None:
    prepaid = {"success": True, "receipt_id": "rcpt_1", "payer": "p", "amount": "0.01"}
    settled = mcp_results.settle_response(prepaid, USDF, "fth:ledger")
    assert settled["transaction"] == "rcpt_1" and settled["network"] == "fth:ledger"
    assert settled["amount"] == "10000" and settled["extra"]["receipt"] == prepaid
    onchain = {**prepaid, "transaction": "0xabc", "network": "eip155:8453"}
    assert mcp_results.settle_response(onchain, USDF, "x")["transaction"] == "0xabc"
    released = mcp_results.settle_response({**prepaid, "amount": "0"}, USDF, "x", "tool_failed")
    assert released["success"] is False and released["errorReason"] == "tool_failed"
    assert released["transaction"] == ""
