"""MCP tool calls priced at the edge, through the real stack: an unmodified FastMCP server
(the official `mcp` SDK, streamable HTTP) behind Envoy and the sidecar, Redis, and for
`exact` anvil with Circle's USDC and `x402 facilitator serve`. The payers are the official
MCP client wrapped by the official `x402.mcp` session (`exact`), and the SDK's
`paying_session` (prepaid). Nothing is mocked."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from x402.schemas import parse_payment_required

from sidecar.agent.mcp import paying_session, prepaid_client
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.server.envoy import contract
from sidecar.tools.chain import AnvilChain
from sidecar.tools.mcp_stack import McpStack
from sidecar.tools.onchain import FacilitatorProcess, exact_settings, official_client, payers
from sidecar.tools.stack import Stack
from tests.support.mcp import RawMcp, calls, messages

WEATHER, RESEARCH = 10_000, 250_000  # 0.01 and 0.25 USDF (= USDC on the chain)
TOOLS = {"get_weather": "0.01", "deep_research": "0.25", "flaky": "0.01", "report": "0.01"}
ROUTES: dict[str, dict[str, Any]] = {
    "tools": {"method": "POST", "path": "/mcp", "mcp": {"tools": TOOLS, "default": "free"}},
}
ON_SUCCESS: dict[str, dict[str, Any]] = {"tools": {**ROUTES["tools"], "charge": "on_success"}}


@pytest.fixture(scope="module")
def gw(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[McpStack]:
    """Charged on check; the server answers each POST as an SSE stream (FastMCP's default)."""
    with McpStack(ROUTES, settings=exact_settings(chain, facilitator)) as running:
        yield running


@pytest.fixture(scope="module")
def held() -> Iterator[McpStack]:
    """Charged on success; the server answers JSON."""
    with McpStack(ON_SUCCESS, json=True) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def funded(stack: Stack, amount: str = "10") -> Wallet:
    wallet = Wallet.generate(budget="5")
    await stack.fund(wallet.public_key, amount)
    return wallet


async def prepaid_payment(wallet: Wallet, required: dict[str, Any]) -> dict[str, Any]:
    """What the SDK's session puts in `_meta["x402/payment"]` for this payment-required."""
    payload = await prepaid_client(wallet).create_payment_payload(parse_payment_required(required))
    dumped: dict[str, Any] = payload.model_dump(by_alias=True)
    return dumped


def keys(stack: Stack) -> dict[str, str]:
    return {stack.gateway_identity.kid: stack.gateway_identity.public_key}


# -- 1. the official MCP client pays `exact` ----------------------------------------------


async def test_the_official_mcp_client_pays_a_tool_with_exact(
    gw: McpStack, chain: AnvilChain
) -> None:
    payer = payers(chain)[0]
    before, ran = chain.balance_of(payer.address), calls(gw).get("get_weather", 0)
    client = official_client(chain, payer, cap=1_000_000)
    async with paying_session(f"{gw.url}/mcp", client=client) as tools:
        result = await tools.call_tool("get_weather", {"city": "Lisbon"})
    assert result.payment_made and not result.is_error
    assert "Lisbon" in result.content[0].text
    settled = result.payment_response
    assert settled is not None and not isinstance(settled, dict)
    assert settled.success and settled.transaction.startswith("0x")
    assert settled.network == chain.network
    assert (settled.payer or "").lower() == payer.address.lower()
    assert settled.amount == str(WEATHER)
    assert settled.extra is not None
    assert protocol.verify_receipt(settled.extra["receipt"], keys(gw))
    assert calls(gw)["get_weather"] == ran + 1  # the tool ran once
    assert chain.balance_of(payer.address) == before - WEATHER  # on chain, by the price


# -- 2. free methods pass and list prices; an unpaid call never reaches the server --------


async def test_initialize_and_tools_list_are_free_and_list_the_prices(
    gw: McpStack, http: httpx.AsyncClient
) -> None:
    wallet = await funded(gw)
    async with paying_session(f"{gw.url}/mcp", wallet=wallet) as tools:
        listed = await tools.list_tools()
        echoed = await tools.call_tool("echo", {"text": "free"})
    prices = {tool.name: (tool.meta or {}).get("x402/price") for tool in listed.tools}
    assert prices["get_weather"] == {"amount": "0.01", "asset": "USDF"}
    assert prices["deep_research"] == {"amount": "0.25", "asset": "USDF"}
    assert prices["echo"] is None  # free: no price
    assert not echoed.payment_made and echoed.content[0].text == "free"
    assert await gw.balance(wallet.public_key) == 10_000_000
    # x402 serve's start-up route table names the tools and their prices
    table = "MCP tools (USDF): deep_research 0.25, flaky 0.01, get_weather 0.01, report 0.01;"
    assert table in gw.processes["sidecar"].log()
    document = (await http.get(f"{gw.url}/.well-known/x402")).json()
    [route] = [r for r in document["routes"] if r.get("mcp")]
    assert route["mcp"]["tools"] == TOOLS and route["mcp"]["default"] == "free"


@pytest.mark.parametrize("accept", ["application/json, text/event-stream", "text/event-stream"])
async def test_an_unpaid_priced_call_is_answered_by_the_gateway(
    gw: McpStack, http: httpx.AsyncClient, accept: str
) -> None:
    raw = await RawMcp(gw, http).start()
    before = calls(gw).get("deep_research", 0)
    response, message = await raw.call("deep_research", {"topic": "x"}, accept=accept)
    assert response.status_code == 200
    sse = accept == "text/event-stream"
    assert response.headers["content-type"].startswith("text/event-stream" if sse else "app")
    assert message["id"] == raw.ids
    result = message["result"]
    assert result["isError"] is True
    required = result["structuredContent"]
    assert required["x402Version"] == 2 and required["error"] == "payment_required"
    assert required["resource"]["url"].endswith("/mcp#deep_research")
    schemes = {offer["scheme"]: offer for offer in required["accepts"]}
    assert schemes["prepaid-ed25519"]["amount"] == str(RESEARCH)
    assert schemes["exact"]["amount"] == str(RESEARCH)
    assert protocol.loads_strict(result["content"][0]["text"].encode()) == required
    assert calls(gw).get("deep_research", 0) == before  # never reached the server


# -- 3. replays, and a tool that fails on an on_success route ------------------------------


async def test_a_replayed_payment_is_redelivered_within_its_limit_and_charged_once(
    gw: McpStack, http: httpx.AsyncClient
) -> None:
    """The same payment for the same call (a lost answer's retry) runs the tool again,
    charged nothing, up to the redelivery limit; with other arguments it is another
    request (a plain 409 payment_identifier_conflict); past the limit nonce_reused
    (docs/protocol.md §13)."""
    wallet = await funded(gw)
    raw = await RawMcp(gw, http).start()
    _, unpaid = await raw.call("get_weather", {"city": "Oslo"})
    payment = await prepaid_payment(wallet, unpaid["result"]["structuredContent"])
    _, paid = await raw.call("get_weather", {"city": "Oslo"}, payment)
    settled = paid["result"]["_meta"]["x402/payment-response"]
    assert settled["success"] is True and settled["amount"] == str(WEATHER)
    ran = calls(gw)["get_weather"]
    conflict, _ = await raw.call("get_weather", {"city": "Paris"}, payment)
    assert conflict.status_code == 409  # plain: not a payment the client can make
    assert conflict.json()["error"] == "payment_identifier_conflict"
    assert calls(gw)["get_weather"] == ran  # another request: never reached the server
    for _ in range(DEFAULT_REDELIVERY_LIMIT):
        _, again = await raw.call("get_weather", {"city": "Oslo"}, payment)
        assert again["result"].get("isError") is not True, again
        resent = again["result"]["_meta"]["x402/payment-response"]
        assert resent["transaction"] == settled["transaction"]  # the same receipt
    assert calls(gw)["get_weather"] == ran + DEFAULT_REDELIVERY_LIMIT
    _, replayed = await raw.call("get_weather", {"city": "Oslo"}, payment)
    assert replayed["result"]["isError"] is True
    assert replayed["result"]["structuredContent"]["error"] == "nonce_reused"
    assert calls(gw)["get_weather"] == ran + DEFAULT_REDELIVERY_LIMIT  # never reached it
    assert await gw.balance(wallet.public_key) == 10_000_000 - WEATHER


async def test_a_failing_tool_costs_nothing_and_the_same_payment_works_later(
    held: McpStack, http: httpx.AsyncClient
) -> None:
    wallet = await funded(held)
    raw = await RawMcp(held, http).start()
    await raw.call("set_flaky", {"fail": True})
    _, unpaid = await raw.call("flaky", {"text": "a"})
    payment = await prepaid_payment(wallet, unpaid["result"]["structuredContent"])
    _, failed = await raw.call("flaky", {"text": "a"}, payment)
    assert failed["result"]["isError"] is True
    released = failed["result"]["_meta"]["x402/payment-response"]
    assert released["success"] is False and released["errorReason"] == "tool_failed"
    assert await held.balance(wallet.public_key) == 10_000_000  # nothing charged
    await raw.call("set_flaky", {"fail": False})
    _, done = await raw.call("flaky", {"text": "a"}, payment)  # the same payment
    assert done["result"].get("isError") is not True
    settled = done["result"]["_meta"]["x402/payment-response"]
    assert settled["success"] is True and settled["amount"] == str(WEATHER)
    assert protocol.verify_receipt(settled["extra"]["receipt"], keys(held))
    assert await held.balance(wallet.public_key) == 10_000_000 - WEATHER
    lines = held.wait_decisions(lambda d: d.get("payer") == wallet.public_key, count=4)
    assert [d["reason"] for d in lines] == ["held", "tool_failed", "held", "captured"]


# -- 4. bad input: typed answers, nothing forwarded ----------------------------------------


def forwarded(stack: Stack) -> int:
    return stack.envoy_counter("cluster.service.upstream_rq_total")


BAD_BODIES: list[tuple[bytes, int, int, str]] = [
    (b"{not json", 400, -32700, "mcp_parse_error"),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/call"}', 400, -32600, "mcp_invalid_request"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 7}', 400, -32600, "mcp_invalid_request"),
    (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 42}}',
        400,
        -32602,
        "mcp_invalid_params",
    ),
    (
        b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": '
        b'{"name": "get_weather", "arguments": {}}}]',
        400,
        -32600,
        "mcp_batch_refused",
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "reason"), BAD_BODIES)
async def test_a_body_that_is_not_json_rpc_gets_a_json_rpc_error(
    gw: McpStack, http: httpx.AsyncClient, body: bytes, status: int, code: int, reason: str
) -> None:
    before = forwarded(gw)
    response = await RawMcp(gw, http).post(body)
    assert response.status_code == status, response.text
    [message] = messages(response)
    assert message["error"]["code"] == code
    assert message["error"]["data"]["reason"] == reason
    assert forwarded(gw) == before


async def test_a_body_over_the_limit_is_refused_413(gw: McpStack, http: httpx.AsyncClient) -> None:
    before = forwarded(gw)
    big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    big["params"] = {"name": "echo", "arguments": {"text": "x" * 70_000}}
    response = await RawMcp(gw, http).post(big)
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"
    assert forwarded(gw) == before


async def test_a_payment_for_another_tool_or_amount_is_refused(
    gw: McpStack, http: httpx.AsyncClient
) -> None:
    wallet = await funded(gw)
    raw = await RawMcp(gw, http).start()
    _, weather = await raw.call("get_weather", {"city": "Rome"})
    payment = await prepaid_payment(wallet, weather["result"]["structuredContent"])
    before = forwarded(gw)
    _, other_tool = await raw.call("flaky", {"text": "b"}, payment)  # same price, other tool
    _, other_amount = await raw.call("deep_research", {"topic": "b"}, payment)
    for answer in (other_tool, other_amount):
        assert answer["result"]["isError"] is True
        assert answer["result"]["structuredContent"]["error"] == "invoice_mismatch"
    assert forwarded(gw) == before
    assert await gw.balance(wallet.public_key) == 10_000_000


# -- 5. what the edge buffers: a body up to MCP_BODY_BYTES, an answer up to MCP_BUFFER_BYTES


async def test_a_body_past_the_edge_buffer_and_within_the_limit_is_checked_and_served(
    gw: McpStack, http: httpx.AsyncClient
) -> None:
    """The edge buffers 32 KiB a connection; an MCP route's stream takes its whole
    request (at most MCP_BODY_BYTES) to the check, where it used to be Envoy's 500."""
    raw = await RawMcp(gw, http).start()
    text = "x" * (contract.MCP_BODY_BYTES - 1024)
    response, echoed = await raw.call("echo", {"text": text})
    assert response.status_code == 200
    assert echoed["result"]["content"][0]["text"] == text


async def test_an_answer_past_the_edge_buffer_is_served_with_its_settlement(
    gw: McpStack, http: httpx.AsyncClient
) -> None:
    wallet = await funded(gw)
    raw = await RawMcp(gw, http).start()
    _, unpaid = await raw.call("report", {"kilobytes": 300})
    payment = await prepaid_payment(wallet, unpaid["result"]["structuredContent"])
    response, paid = await raw.call("report", {"kilobytes": 300}, payment)
    assert response.status_code == 200
    assert paid["result"]["content"][0]["text"] == "r" * 300 * 1024
    settled = paid["result"]["_meta"]["x402/payment-response"]
    assert settled["success"] is True and settled["amount"] == str(WEATHER)
    assert protocol.verify_receipt(settled["extra"]["receipt"], keys(gw))
    assert await gw.balance(wallet.public_key) == 10_000_000 - WEATHER


async def test_an_answer_over_the_buffer_paid_on_check_is_served_whole(
    gw: McpStack, http: httpx.AsyncClient
) -> None:
    """Paid at the check, an answer longer than MCP_BUFFER_BYTES (an SSE stream) is served
    as the tool wrote it, without the settlement its `_meta` has no room for; the receipt
    is in its headers, and the payment was charged once (it was Envoy's 500, paid)."""
    wallet = await funded(gw)
    raw = await RawMcp(gw, http).start()
    arguments = {"kilobytes": contract.MCP_BUFFER_BYTES // 1024 + 64}
    _, unpaid = await raw.call("report", arguments)
    payment = await prepaid_payment(wallet, unpaid["result"]["structuredContent"])
    ran = calls(gw).get("report", 0)
    response, paid = await raw.call("report", arguments, payment)
    assert response.status_code == 200
    assert paid["result"]["content"][0]["text"] == "r" * arguments["kilobytes"] * 1024
    assert "x402/payment-response" not in (paid["result"].get("_meta") or {})
    receipt = protocol.decode_header(response.headers["x-payment-response"])
    assert protocol.verify_receipt(receipt, keys(gw)) and receipt["amount"] == "0.01"
    assert calls(gw)["report"] == ran + 1
    assert await gw.balance(wallet.public_key) == 10_000_000 - WEATHER


async def test_an_answer_over_the_buffer_is_envoys_500_and_its_hold_goes_back_at_once() -> None:
    """Longer than MCP_BUFFER_BYTES, the answer cannot carry its settlement: Envoy fails
    it, and the hold is released when the response phase's stream ends without its body,
    not at its expiry (60 s). The answer is an SSE stream whose headers leave before the
    tool's result (FastMCP's default), so the phase has them when Envoy fails the body."""
    with McpStack(ON_SUCCESS) as held_sse:
        async with httpx.AsyncClient(timeout=30) as http:
            wallet = await funded(held_sse)
            raw = await RawMcp(held_sse, http).start()
            arguments = {"kilobytes": contract.MCP_BUFFER_BYTES // 1024 + 64, "seconds": 1.0}
            _, unpaid = await raw.call("report", arguments)
            payment = await prepaid_payment(wallet, unpaid["result"]["structuredContent"])
            params = {"name": "report", "arguments": arguments, "_meta": {"x402/payment": payment}}
            failed = await raw.post(raw.request("tools/call", params))
            assert failed.status_code == 500
            released = held_sse.wait_decisions(
                lambda d: d.get("payer") == wallet.public_key and d.get("phase") == "response"
            )
            assert [(d["decision"], d["reason"]) for d in released] == [("release", "not_served")]
            assert await held_sse.balance(wallet.public_key) == 10_000_000
