"""The demo's MCP step: an agent pays an MCP tool. The demo's gateway also fronts an
unmodified FastMCP server (tools/mcp_upstream.py, on the gateway's own host and port at
/mcp); the agent, on the official MCP client wrapped by x402.mcp's session and paying
from its prepaid wallet (sidecar/agent/mcp.py), lists the tools with their prices, calls
a free one, then a priced one: paid on the first try, the settlement in the result."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from sidecar.agent.mcp import paying_session
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.money import to_decimal
from sidecar.tools.demo.narration import Narration
from sidecar.tools.demo.world import MCP_PATH, MCP_TOOLS
from sidecar.tools.mcp_stack import McpStack

PRICED = "get_weather"


class McpLane:
    def __init__(self, story: Narration, stack: McpStack) -> None:
        self.story, self.stack = story, stack

    def run(self) -> None:
        self.story.step(
            "9. An agent pays an MCP tool",
            f"An unmodified FastMCP server sits behind the same gateway at {MCP_PATH}.\n"
            "tools/list shows each tool's price; a tools/call of a priced tool is paid in\n"
            'its _meta["x402/payment"], the settlement comes back in the result\'s _meta.',
        )
        wallet = Wallet.generate(max_amount="0.25", budget="1")
        asyncio.run(self.stack.fund(wallet.public_key, "1"))
        ran_before = self.calls().get(PRICED, 0)
        facts = asyncio.run(self.pay(wallet))
        for name, price in facts["prices"].items():
            self.story.console.print(f"tool {name:<14} {price}")
        receipt = facts["receipt"]
        self.story.console.print(
            f"tools/call {PRICED} → paid {receipt['amount']} USDF, receipt "
            f"{receipt['receipt_id']}, {facts['text']}"
        )
        balance = to_decimal(asyncio.run(self.stack.balance(wallet.public_key)), 6)
        self.story.check(
            "mcp tool paid",
            facts["paid"]
            and not facts["free_paid"]
            and facts["verified"]
            and self.calls().get(PRICED, 0) == ran_before + 1
            and balance == "0.99",
            f"{MCP_TOOLS[PRICED]} USDF for one call, the tool ran once; balance {balance}",
        )

    def calls(self) -> dict[str, int]:
        counts: dict[str, int] = httpx.get(f"{self.stack.server_url}/calls", timeout=10).json()
        return counts

    async def pay(self, wallet: Wallet) -> dict[str, Any]:
        keys = {self.stack.gateway_identity.kid: self.stack.gateway_identity.public_key}
        async with paying_session(self.stack.url + MCP_PATH, wallet=wallet) as tools:
            listed = await tools.list_tools()
            prices = {
                tool.name: (tool.meta or {}).get("x402/price", {}).get("amount", "free")
                for tool in listed.tools
            }
            free = await tools.call_tool("echo", {"text": "hello"})
            result = await tools.call_tool(PRICED, {"city": "Paris"})
        settled = result.payment_response
        receipt = getattr(settled, "extra", None) or {}
        receipt = receipt.get("receipt", {})
        return {
            "prices": prices,
            "free_paid": free.payment_made,
            "paid": result.payment_made and bool(getattr(settled, "success", False)),
            "receipt": receipt,
            "verified": bool(receipt) and protocol.verify_receipt(receipt, keys),
            "text": getattr(result.content[0], "text", "") if result.content else "",
        }
